//! kontext-engine
