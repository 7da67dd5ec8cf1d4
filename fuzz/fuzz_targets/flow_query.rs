//! A flow query string as the controller's `GET /flows?…` reads it: refused with an error or
//! parsed, and what parses is written back by `to_query` to the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_core::flow::FlowRequest;

fuzz_target!(|data: &[u8]| {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(request) = FlowRequest::from_query(query) {
        let again = FlowRequest::from_query(&request.to_query()).expect("its own query parses");
        assert_eq!(again, request);
    }
});
