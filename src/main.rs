//! The `amoe` command line: devices, conformance, benchmarks, training (see `cli`).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
