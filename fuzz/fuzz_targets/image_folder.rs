#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| repvgg_fuzz::image_folder(data));
