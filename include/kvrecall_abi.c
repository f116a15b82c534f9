/* The C side of the ABI target: only the default configuration, which needs no Swift. */
#include "kvrecall.h"
#include <string.h>

void kvrecall_config_default(kvrecall_config *config, uint32_t layers, uint32_t kv_heads,
                             uint32_t query_heads_per_kv, uint32_t head_dim) {
    if (!config) return;
    memset(config, 0, sizeof *config);
    config->struct_size = sizeof *config;
    config->layers = layers;
    config->kv_heads = kv_heads;
    config->query_heads_per_kv = query_heads_per_kv;
    config->head_dim = head_dim;
    config->dtype = KVRECALL_F16;
    config->method = KVRECALL_METHOD_RETRIEVAL;
    config->k = 100;
    config->sinks = 4;
    config->window = 64;
    config->ef = 400;
    config->nprobe = 64;
}
