//! kontext-kernels
