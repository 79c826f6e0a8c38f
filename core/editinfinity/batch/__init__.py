"""Many edits: validate and group the cases on a CPU, split them into shards, run long-lived GPU workers."""
