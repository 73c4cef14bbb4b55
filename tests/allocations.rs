//! No allocation is sized by a length field a peer sent (issue 23). Every
//! length-prefixed read of the database fronts (startup messages, login
//! messages, MySQL packets) checks the length against its limit, then
//! reads the body through `framing::read_body`; their own properties hold
//! the first half, this holds the second: for any declared length, the
//! memory taken follows the bytes that arrived, so a peer claiming 4 GiB
//! and sending ten bytes gets a buffer for ten.
//!
//! The process's allocator is capped around each read (the `cap` crate):
//! an allocation past the cap fails, which aborts this test binary with
//! "memory allocation of N bytes failed". The cap is process-wide, so this
//! binary holds this one test.

use std::alloc::System;
use std::sync::LazyLock;

use cap::Cap;
use proptest::prelude::*;

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

/// The runtime's own bookkeeping for one `block_on`, and the read buffer's
/// first reservation.
const SLACK: usize = 4096;

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime")
});

proptest! {
    #[test]
    fn a_declared_length_takes_memory_only_as_its_bytes_arrive(
        declared in any::<u32>(),
        sent in prop::collection::vec(any::<u8>(), 0..8192),
    ) {
        let runtime = &*RUNTIME;
        let declared = declared as usize;
        // A growing buffer at most doubles past what it holds.
        let budget = 2 * sent.len().min(declared) + SLACK;
        let before = ALLOCATOR.allocated();
        prop_assert!(ALLOCATOR.set_limit(before + budget).is_ok());
        let read = runtime.block_on(sealgate::framing::read_body(&mut &sent[..], declared));
        let _ = ALLOCATOR.set_limit(usize::MAX);
        match read {
            Ok(body) => prop_assert_eq!(&body[..], &sent[..declared]),
            Err(_) => prop_assert!(sent.len() < declared),
        }
    }
}
