"""Pure functions of tensors and arrays: aggregation and the exact residual, partitions, the scenario,
metrics, prototypes, update screening and communication accounting. No I/O, no model, no global state."""
