//! Raw io_uring TCP relay baseline (being written).
fn main() {}
