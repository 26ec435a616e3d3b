#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| netchannel_fuzz::shm::run(data));
