#![no_main]
//! The UAPI `get=1` / `set=1` response parser on arbitrary input: whatever a
//! broken or hostile userspace WireGuard writes on its socket must never
//! panic it.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    warren::wg::uapi::fuzz_response(data);
});
