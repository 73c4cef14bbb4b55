//! The load `benches/mysqlbench.sh` drives each target with. Point
//! selects: CONNECTIONS connections, each running a prepared
//! `SELECT v FROM kv WHERE id = ?` (random ids in 1..=ROWS) back to back
//! for SECONDS; prints how many ran and their latency percentiles. A big
//! result: MIB MiB of 1 KiB rows read and dropped, as fast as they come;
//! prints the bytes and seconds. The URL (with its password, if any) comes
//! from the environment, not argv.
//!
//!   MYSQL_URL=mysql://app@127.0.0.1:3307/bench \
//!     cargo run --release --example mysql_load -- CONNECTIONS SECONDS ROWS
//!   MYSQL_URL=... cargo run --release --example mysql_load -- result MIB

use std::time::{Duration, Instant};

use mysql_async::prelude::*;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("MYSQL_URL")?;
    let opts = mysql_async::OptsBuilder::from_opts(mysql_async::Opts::from_url(&url)?)
        .prefer_socket(false);
    if std::env::args().nth(1).as_deref() == Some("result") {
        let mib: u64 = std::env::args().nth(2).ok_or("result MIB")?.parse()?;
        return big_result(opts, mib).await;
    }
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let [connections, seconds, rows] = args[..] else {
        return Err("usage: mysql_load CONNECTIONS SECONDS ROWS".into());
    };
    let until = Instant::now() + Duration::from_secs(seconds);
    let workers = (0..connections).map(|n| {
        let opts = opts.clone();
        tokio::spawn(async move {
            let mut conn = mysql_async::Conn::new(opts).await?;
            let statement = conn.prep("SELECT v FROM kv WHERE id = ?").await?;
            let mut latencies = Vec::new();
            let mut id = n * 7919;
            while Instant::now() < until {
                id = (id * 48271 + 11) % rows + 1;
                let started = Instant::now();
                let _: Option<String> = conn.exec_first(&statement, (id,)).await?;
                latencies.push(started.elapsed().as_micros() as u64);
            }
            conn.disconnect().await?;
            Ok::<_, mysql_async::Error>(latencies)
        })
    });
    let mut all = Vec::new();
    for worker in futures_util::future::join_all(workers).await {
        all.extend(worker??);
    }
    all.sort_unstable();
    let at = |q: f64| {
        all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "queries={} p50_us={} p99_us={}",
        all.len(),
        at(0.5),
        at(0.99)
    );
    Ok(())
}

async fn big_result(
    opts: mysql_async::OptsBuilder,
    mib: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut conn = mysql_async::Conn::new(opts).await?;
    let started = Instant::now();
    let mut bytes = 0usize;
    let mut rows = conn
        .query_iter(format!(
            "SELECT REPEAT('x', 1023) FROM seq_1_to_{}",
            mib * 1024
        ))
        .await?;
    while let Some(row) = rows.next().await? {
        let value: Vec<u8> = mysql_async::from_row(row);
        bytes += value.len() + 1;
    }
    drop(rows);
    conn.disconnect().await?;
    println!(
        "bytes={bytes} seconds={:.3}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
