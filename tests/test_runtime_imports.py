"""Run time needs no torch: loading the default model and generating never imports it."""
import subprocess
import sys

import pytest

SCRIPT = """
import sys
from llaisys import LLM, SamplingParams
llm = LLM(sys.argv[1], n_ctx=256)
out = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=4, temperature=0.7, seed=0))
assert out[0].outputs[0].token_ids, "nothing generated"
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print(loaded[:5])
sys.exit(1 if loaded else 0)
"""


@pytest.mark.slow
def test_generation_imports_no_torch(default_model):
    pytest.importorskip("torch")  # only meaningful where torch is installed and could sneak in
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(default_model)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"torch was imported: {result.stdout} {result.stderr[-2000:]}"
