#![forbid(unsafe_code)]

/// glibc's malloc hands each 64 KiB body buffer back to the kernel and
/// faults it in again on the next request; mimalloc keeps it, which is most
/// of the per-request CPU difference between pingora and nginx (issue 7,
/// docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sealgate::cli::main()
}
