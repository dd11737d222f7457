#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| repvgg_fuzz::v2_infer_request(data));
