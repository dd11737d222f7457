#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| repvgg_fuzz::spec_json(data));
