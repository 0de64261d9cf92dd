//! wasmtime's configuration: the component model, epoch interruption (the time limit) and the
//! pooling allocator, which makes a fresh instance per request cost microseconds. The pool is
//! sized once, at start, for every instance that may exist at once.

use wasmtime::{Config, InstanceAllocationStrategy, PoolingAllocationConfig};

/// wasmtime's configuration for up to `max_instances` guest instances at once, each with at
/// most `memory_bytes` of linear memory.
pub(super) fn wasmtime_config(max_instances: u32, memory_bytes: usize) -> Config {
    let mut pool = PoolingAllocationConfig::new();
    // Language runtimes (CPython, SpiderMonkey) bring a handful of core modules, memories and
    // large tables per component; these bounds fit them with room to spare.
    let instances = max_instances;
    pool.total_component_instances(instances)
        .total_core_instances(instances * 32)
        .total_memories(instances * 8)
        .total_tables(instances * 16)
        .total_stacks(instances)
        .max_core_instances_per_component(32)
        .max_memories_per_component(8)
        .max_tables_per_component(16)
        .max_memory_size(memory_bytes)
        .table_elements(1 << 16)
        .max_component_instance_size(1 << 20)
        .max_core_instance_size(1 << 20);
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config
}
