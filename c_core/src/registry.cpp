#include "registry.hpp"

namespace llaisys {

static const ModelType kModelTypes[] = {
    {"qwen2", create_qwen2},
    {"mock", create_mock},
};

const ModelType *model_types(int32_t &count) {
    count = int32_t(sizeof kModelTypes / sizeof kModelTypes[0]);
    return kModelTypes;
}

} // namespace llaisys
