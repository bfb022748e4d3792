//! Any byte string handed to the safetensors header parser either parses into a header whose
//! every tensor lies inside the data section with a length matching shape × dtype, or is
//! rejected with an error. It never panics.
#![no_main]

use kontext_loader::safetensors::parse_header;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = parse_header(Path::new("fuzz.safetensors"), data, data.len() as u64) else {
        return;
    };
    let data_len = data.len() as u64 - header.data_start;
    let mut spans = Vec::new();
    for (key, t) in &header.tensors {
        assert!(t.begin <= t.end && t.end <= data_len, "{key} outside the data section");
        assert_eq!((t.end - t.begin) as usize, t.numel() * t.dtype.size_bytes(), "{key} length");
        if t.end > t.begin {
            spans.push((t.begin, t.end));
        }
    }
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[1].0 >= w[0].1, "overlap accepted");
    }
});
