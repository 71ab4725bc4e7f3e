//! `replctl demo` (placeholder until the replication demo lands).

/// Options of `replctl demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Keep the temp directory (images, configs, logs) for inspection.
    #[arg(long)]
    pub keep: bool,
}

pub fn run(_args: &DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("demo is not available in this build yet")
}
