// The model registry: each model type is a name and a factory. Adding a type adds a row here
// and a source file; the public API does not change.
#pragma once

#include <cstdint>

#include "model.hpp"

namespace llaisys {

// A factory validates the architecture fields it needs (throwing InvalidArgument) and builds the
// model, over `shared` weights of a model of the same type and architecture when given.
using ModelFactory = Model *(*)(const llaisys_model_params &params, std::shared_ptr<WeightStore> shared);

struct ModelType {
    const char *name;
    ModelFactory create;
};

Model *create_qwen2(const llaisys_model_params &params, std::shared_ptr<WeightStore> shared);
Model *create_mock(const llaisys_model_params &params, std::shared_ptr<WeightStore> shared);

const ModelType *model_types(int32_t &count);

} // namespace llaisys
