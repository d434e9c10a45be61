//! The operator's command: what the platform set aside, and how to bring it back.
//!
//!   fhirctl outbox list                  records the relay could not publish (parked)
//!   fhirctl outbox retry --all | ID...   hand them back to the relay (after raising a limit)
//!   fhirctl outbox drop ID... --why T    give them up (kept on record as dropped)
//!   fhirctl dlq list [--reason R]        dead letters on sor.dlq.v1
//!   fhirctl dlq show P:O                 one dead letter, whole (it can hold PHI: a terminal only)
//!   fhirctl dlq redrive P:O...           publish the originals to their source topics again
//!   fhirctl rebuild --all | --member M | --since T
//!                                        recompute composites from their components
//!   fhirctl replay --all | --member M [--partner P]
//!                                        publish current composites again, no new versions
//!   fhirctl retention run                remove what is past retention now (RETENTION_*)
//!   fhirctl retention verify MANIFEST    check an exported audit month against its manifest
//!
//! Redriving is safe to repeat: the composer ignores an event id it applied before, and a
//! message that still fails is dead-lettered again. Rebuilding is too: a composite whose
//! content did not change gets no new version. A replay sends records again with their event
//! ids and versionIds, which consumers already deduplicate on.

mod composites;

use clap::{Args, Parser, Subcommand};
use platform::CommonConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "fhirctl", about = "Operate the platform: parked outbox records, dead letters, rebuilding and replaying composites")]
struct Cli {
    #[command(flatten)]
    common: CommonConfig,
    /// Print JSON lines instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Outbox records the relay parked because the broker refused them.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Dead letters: system-of-record messages the composer could not apply.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Recompute composites from their stored components (after a deploy that built them
    /// wrong): a new version, published and notified, only where the content differs.
    Rebuild {
        #[command(flatten)]
        which: Which,
        /// Only members whose components changed since this instant (RFC 3339).
        #[arg(long, conflicts_with_all = ["all", "member"])]
        since: Option<String>,
    },
    /// Publish current composites again, without new versions: to everyone's topics, or (with
    /// --partner) to one partner's topic only, for a partner that lost its copy. Subscribers
    /// are not notified again.
    Replay {
        #[command(flatten)]
        which: Which,
        /// Only this partner's topic (its attributed members among those chosen).
        #[arg(long)]
        partner: Option<String>,
    },
    /// Retention: what the relay runs on its schedule, now; and checking an audit export.
    #[command(subcommand)]
    Retention(RetentionCommand),
}

#[derive(Subcommand)]
enum RetentionCommand {
    /// Remove what is past retention (the same RETENTION_* settings as the relay's), export
    /// and drop audit months past RETENTION_AUDIT_MONTHS. Prints what it removed.
    Run {
        #[command(flatten)]
        retention: relay::retention::RetentionConfig,
    },
    /// Check an exported audit month (its file's SHA-256, row count and ids) against its manifest.
    Verify {
        /// `<partition>.manifest.json` in the export directory.
        manifest: std::path::PathBuf,
    },
}

#[derive(Args)]
struct Which {
    /// Every member.
    #[arg(long, conflicts_with = "member")]
    all: bool,
    /// One member.
    #[arg(long)]
    member: Option<String>,
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// List parked records, oldest first.
    List,
    /// Hand parked records back to the relay, which publishes them in order with the rest.
    Retry(Selection),
    /// Give parked records up: they are marked published and keep their reason, with yours.
    Drop {
        /// Outbox ids (from `list`).
        #[arg(required = true)]
        ids: Vec<i64>,
        /// Why, for the record.
        #[arg(long)]
        why: String,
    },
}

#[derive(Args)]
struct Selection {
    /// Every parked record.
    #[arg(long, conflicts_with = "ids")]
    all: bool,
    /// Outbox ids (from `list`).
    ids: Vec<i64>,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters (oldest first per partition), without their payloads.
    List {
        /// Only this reason (`invalid-json`, `schema`, `mapping`, `key`, `too-large`,
        /// `composite-too-large`, `refused`, …).
        #[arg(long)]
        reason: Option<String>,
        /// Only dead letters from this source topic (contract name).
        #[arg(long)]
        source_topic: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Show one dead letter with its headers and payload. The payload is a system of record's
    /// message and can hold PHI: read it on a terminal, do not paste it into tickets.
    Show {
        /// `PARTITION:OFFSET` on the dead-letter topic (from `list`).
        at: Position,
    },
    /// Publish the original messages again to their source topics (fetched from there when
    /// still retained, else rebuilt from the dead letter).
    Redrive {
        #[arg(required = true)]
        at: Vec<Position>,
    },
}

#[derive(Debug, Clone, Copy)]
struct Position {
    partition: i32,
    offset: i64,
}

impl std::str::FromStr for Position {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (p, o) = s.split_once(':').ok_or("expected PARTITION:OFFSET, e.g. 0:42")?;
        Ok(Position { partition: p.parse().map_err(|_| "bad partition")?, offset: o.parse().map_err(|_| "bad offset")? })
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    platform::telemetry::init("warn", platform::LogFormat::Text);
    match &cli.command {
        Command::Outbox(command) => outbox(&cli, command).await,
        Command::Dlq(command) => dlq(&cli, command).await,
        Command::Rebuild { which, since } => rebuild(&cli, which, since.as_deref()).await,
        Command::Replay { which, partner } => replay(&cli, which, partner.as_deref()).await,
        Command::Retention(command) => retention(&cli, command).await,
    }
}

async fn retention(cli: &Cli, command: &RetentionCommand) -> anyhow::Result<()> {
    match command {
        RetentionCommand::Run { retention } => {
            let pool = db::connect_configured(&cli.common, 2).await?;
            let report = relay::retention::run(&pool, retention, &cli.common.fhir_base_url, &relay::retention::Metrics::default()).await?;
            tracing::warn!(deleted = ?report.deleted, audit_months = report.audit.len(), "retention run by an operator");
            if cli.json {
                println!("{}", serde_json::to_string(&report)?);
            } else if report.skipped {
                println!("another process is running retention; nothing done");
            } else {
                for (table, n) in &report.deleted {
                    println!("{table:<22} {n} rows removed");
                }
                for manifest in &report.audit {
                    println!("audit month exported, verified and dropped: {}", manifest.display());
                }
            }
        }
        RetentionCommand::Verify { manifest } => {
            let m = relay::retention::verify(manifest)?;
            if cli.json {
                println!("{}", serde_json::to_string(&m)?);
            } else {
                println!("{}: {} events (ids {:?}..{:?}), SHA-256 {} matches", m.file, m.rows, m.first_id, m.last_id, m.sha256);
            }
        }
    }
    Ok(())
}

async fn rebuild(cli: &Cli, which: &Which, since: Option<&str>) -> anyhow::Result<()> {
    let members = match (which.all, &which.member, since) {
        (true, _, _) => composites::Members::All,
        (_, Some(m), _) => composites::Members::One(m.clone()),
        (_, _, Some(t)) => composites::Members::TouchedSince(
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).map_err(|e| anyhow::anyhow!("--since {t}: {e}"))?,
        ),
        _ => anyhow::bail!("name the members: --all, --member M or --since T"),
    };
    let pool = db::connect_configured(&cli.common, 1).await?;
    let progress = composites::progress(None, "rebuilding", cli.json);
    let done = composites::rebuild(&pool, &fhir::composites(&cli.common)?, members, &progress).await?;
    progress.finish_and_clear();
    tracing::warn!(members = done.members, new_versions = done.new_versions, "composites rebuilt by an operator");
    if cli.json {
        println!("{}", json!(done));
    } else {
        println!("{} members rebuilt, {} new versions", done.members, done.new_versions);
    }
    Ok(())
}

async fn replay(cli: &Cli, which: &Which, partner: Option<&str>) -> anyhow::Result<()> {
    anyhow::ensure!(which.all || which.member.is_some(), "name the members: --all or --member M");
    let pool = db::connect_configured(&cli.common, 1).await?;
    let member = which.member.as_deref();
    let (queued, to) = match partner {
        Some(p) => (db::partner_topics::recarry(&pool, p, member).await?, format!("partner {p}'s topic")),
        None => {
            let progress = composites::progress(None, "replaying", cli.json);
            let n = composites::replay_everywhere(&pool, member, &progress).await?;
            progress.finish_and_clear();
            (n, "every topic".to_owned())
        }
    };
    tracing::warn!(records = queued, partner = partner.unwrap_or("-"), "composites replayed by an operator");
    if cli.json {
        println!("{}", json!({ "queued": queued, "partner": partner }));
    } else {
        println!("{queued} current composites queued for {to}; the relay publishes them in order");
    }
    Ok(())
}

async fn outbox(cli: &Cli, command: &OutboxCommand) -> anyhow::Result<()> {
    let pool = db::connect_configured(&cli.common, 1).await?;
    match command {
        OutboxCommand::List => {
            let rows = db::outbox::parked(&pool, None).await?;
            for r in &rows {
                let parked = platform::time::instant(r.parked_at);
                if cli.json {
                    let line = json!({ "id": r.id, "topic": r.topic, "member_id": r.member_id, "version_id": r.version_id,
                        "parked_at": parked, "size": r.size, "reason": r.reason });
                    println!("{line}");
                } else {
                    println!("{:>10}  {parked}  {}  {} v{}  {} bytes  {}", r.id, r.topic, r.member_id, r.version_id, r.size.unwrap_or(0), r.reason);
                }
            }
            if !cli.json {
                println!("{} parked", rows.len());
            }
        }
        OutboxCommand::Retry(selection) => {
            anyhow::ensure!(selection.all || !selection.ids.is_empty(), "name the ids to retry, or --all");
            let ids = (!selection.all).then_some(selection.ids.as_slice());
            let n = db::outbox::unpark(&pool, ids).await?;
            println!("{n} handed back to the relay");
        }
        OutboxCommand::Drop { ids, why } => {
            let n = db::outbox::drop_parked(&pool, ids, why).await?;
            tracing::warn!(records = n, "outbox records dropped by an operator");
            println!("{n} dropped");
        }
    }
    Ok(())
}

/// A reader of the dead-letter topic that never joins a group or commits.
fn reader(cli: &Cli) -> anyhow::Result<BaseConsumer> {
    Ok(platform::kafka::client(&cli.common.kafka)?
        .set("group.id", "fhirctl")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("log_level", "3")
        .create()?)
}

fn header(m: &OwnedMessage, name: &str) -> String {
    m.headers()
        .and_then(|h| h.iter().find(|x| x.key == name).and_then(|x| x.value.map(|v| String::from_utf8_lossy(v).into_owned())))
        .unwrap_or_default()
}

/// The message at `partition:offset` of `topic`, if it is still there.
fn fetch(consumer: &BaseConsumer, topic: &str, partition: i32, offset: i64) -> anyhow::Result<Option<OwnedMessage>> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) if m.partition() == partition && m.offset() == offset => return Ok(Some(m.detach())),
            Some(Ok(m)) if m.partition() == partition && m.offset() > offset => return Ok(None),
            Some(Err(e)) => anyhow::bail!("reading {topic}: {e}"),
            _ => {}
        }
    }
    Ok(None)
}

async fn dlq(cli: &Cli, command: &DlqCommand) -> anyhow::Result<()> {
    let kafka = &cli.common.kafka;
    let topic = kafka.topic(platform::topics::DLQ);
    let consumer = reader(cli)?;
    match command {
        DlqCommand::List { reason, source_topic, limit } => {
            let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
            let partitions: Vec<i32> = metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
            let mut listed = 0;
            for partition in partitions {
                let (low, high) = consumer.fetch_watermarks(&topic, partition, Duration::from_secs(10))?;
                if high <= low {
                    continue;
                }
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&topic, partition, Offset::Offset(low))?;
                consumer.assign(&tpl)?;
                let mut next = low;
                while next < high && listed < *limit {
                    let Some(polled) = consumer.poll(Duration::from_secs(10)) else { break };
                    let m = polled?;
                    next = m.offset() + 1;
                    let m = m.detach();
                    let why = header(&m, "dlq.reason");
                    let source = header(&m, "dlq.source.topic");
                    if reason.as_ref().is_some_and(|r| *r != why) || source_topic.as_ref().is_some_and(|t| *t != source) {
                        continue;
                    }
                    listed += 1;
                    let at = format!("{partition}:{}", m.offset());
                    let from = format!("{source}/{}:{}", header(&m, "dlq.source.partition"), header(&m, "dlq.source.offset"));
                    let size = m.payload().map_or(0, <[u8]>::len);
                    let reference = header(&m, "dlq.payload") == "reference";
                    let error = header(&m, "dlq.error");
                    if cli.json {
                        println!("{}", json!({ "at": at, "reason": why, "source": from, "error": error, "size": size, "reference": reference }));
                    } else {
                        let note = if reference { " (payload kept only in the source topic)" } else { "" };
                        println!("{at:>10}  {why:<20}  {from}  {size} bytes{note}  {error}");
                    }
                }
            }
            if !cli.json {
                println!("{listed} listed");
            }
        }
        DlqCommand::Show { at } => {
            let m = fetch(&consumer, &topic, at.partition, at.offset)?
                .ok_or_else(|| anyhow::anyhow!("no dead letter at {}:{}", at.partition, at.offset))?;
            let headers: serde_json::Map<String, serde_json::Value> = m
                .headers()
                .map(|h| h.iter().map(|x| (x.key.to_owned(), json!(String::from_utf8_lossy(x.value.unwrap_or_default())))).collect())
                .unwrap_or_default();
            let shown = json!({
                "at": format!("{}:{}", at.partition, at.offset),
                "key": m.key().map(String::from_utf8_lossy),
                "headers": headers,
                "payload": m.payload().map(String::from_utf8_lossy),
            });
            println!("{}", if cli.json { shown.to_string() } else { serde_json::to_string_pretty(&shown)? });
        }
        DlqCommand::Redrive { at } => {
            let producer = platform::kafka::prompt_producer(kafka)?;
            for position in at {
                let letter = fetch(&consumer, &topic, position.partition, position.offset)?
                    .ok_or_else(|| anyhow::anyhow!("no dead letter at {}:{}", position.partition, position.offset))?;
                let source = header(&letter, "dlq.source.topic");
                anyhow::ensure!(
                    platform::topics::SOR_TOPICS.contains(&source.as_str()),
                    "{}:{} came from {source:?}, not a sor.* topic",
                    position.partition,
                    position.offset
                );
                let (partition, offset) =
                    (header(&letter, "dlq.source.partition").parse::<i32>()?, header(&letter, "dlq.source.offset").parse::<i64>()?);
                let source_topic = kafka.topic(&source);
                // The original as it was received, when the source topic still has it.
                let original = fetch(&consumer, &source_topic, partition, offset)?;
                let (key, payload, headers) = match &original {
                    Some(m) => (m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec), copy_headers(m, |_| true)),
                    None => {
                        anyhow::ensure!(
                            header(&letter, "dlq.payload") != "reference" && header(&letter, "dlq.key.sha256").is_empty(),
                            "{}:{}: the original is no longer in {source} and the dead letter holds only a reference to it",
                            position.partition,
                            position.offset
                        );
                        (letter.key().map(<[u8]>::to_vec), letter.payload().map(<[u8]>::to_vec), copy_headers(&letter, |k| !k.starts_with("dlq.")))
                    }
                };
                let from = format!("{}:{}", position.partition, position.offset);
                let headers = headers.insert(Header { key: "dlq.redriven.from", value: Some(from.as_str()) });
                let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&source_topic).headers(headers);
                if let Some(k) = &key {
                    record = record.key(k);
                }
                if let Some(p) = &payload {
                    record = record.payload(p);
                }
                let (p, o) = producer.send(record, Duration::from_secs(30)).await.map(|d| (d.partition, d.offset)).map_err(|(e, _)| e)?;
                tracing::warn!(dead_letter = %from, topic = %source, partition = p, offset = o, "dead letter redriven by an operator");
                println!("{from} -> {source} {p}:{o}");
            }
        }
    }
    Ok(())
}

fn copy_headers(m: &OwnedMessage, keep: impl Fn(&str) -> bool) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    if let Some(h) = m.headers() {
        for x in h.iter().filter(|x| keep(x.key)) {
            out = out.insert(Header { key: x.key, value: x.value });
        }
    }
    out
}
