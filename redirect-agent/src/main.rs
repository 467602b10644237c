//! The `redirect-agent` binary: its command line lives in the library (`cli`), so that every
//! module of the agent can stay private to it.

fn main() -> std::process::ExitCode {
    redirect_agent::main()
}
