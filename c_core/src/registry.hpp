// The model registry: each model type is a name and a factory. Adding a type adds a row here
// and a source file; the public API does not change.
#pragma once

#include <cstdint>

#include "model.hpp"

namespace llaisys {

// A factory validates the architecture fields it needs (throwing InvalidArgument) and builds the model.
using ModelFactory = Model *(*)(const llaisys_model_params &params);

struct ModelType {
    const char *name;
    ModelFactory create;
};

Model *create_qwen2(const llaisys_model_params &params);
Model *create_mock(const llaisys_model_params &params);

const ModelType *model_types(int32_t &count);

} // namespace llaisys
