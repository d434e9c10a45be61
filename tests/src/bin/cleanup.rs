//! Deletes the topics earlier test and benchmark runs left on the broker (namespaces `t_…`,
//! `bench_…`), so the broker's start-up and metadata stay small on a machine that runs the
//! suite again and again. `scripts/test` runs it before the tests.

use rdkafka::admin::AdminOptions;
use std::time::Duration;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let admin = tests::admin_client()?;
    let metadata = admin.inner().fetch_metadata(None, Duration::from_secs(10))?;
    let stale: Vec<String> =
        metadata.topics().iter().map(|t| t.name().to_owned()).filter(|n| n.starts_with("t_") || n.starts_with("bench_")).collect();
    for chunk in stale.chunks(200) {
        let names: Vec<&str> = chunk.iter().map(String::as_str).collect();
        for result in admin.delete_topics(&names, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))).await? {
            if let Err((name, e)) = result {
                eprintln!("could not delete {name}: {e}");
            }
        }
    }
    println!("deleted {} topics left by earlier runs", stale.len());
    Ok(())
}
