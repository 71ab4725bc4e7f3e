//! `replctl bench` (placeholder until the benchmark lands).

/// Options of `replctl bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[arg(long, default_value = "1G")]
    pub size: String,
}

pub fn run(_args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench is not available in this build yet")
}
