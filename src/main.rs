fn main() -> std::process::ExitCode {
    sealgate::cli::main()
}
