//! Queue mode (`--queue redis://…`): any number of workers and HTTP fronts sharing jobs through a
//! Redis Stream with a consumer group.
//!
//! Keys, all under `sdw:{queue name}:`
//! - `jobs`: the stream of queued jobs (fields `id`, `spec`), consumer group `workers`. Its length
//!   is the fleet's backlog: entries are deleted once their job is finished or cancelled.
//! - `job:{id}`: a hash with the job's state (status, parameters, owner, progress, preview, result,
//!   error, worker, attempts, cancel flag); it expires `--job-expiry-secs` after the job ends.
//! - `events:{id}`: a capped stream of the job's events (progress, preview, status, complete,
//!   error) that every front follows to serve SSE and waiting requests.
//! - `model`: the workers' own (`-m`) model's description, refreshed by every live worker (fronts
//!   validate requests against it); `workers`: a sorted set of live workers by last heartbeat; `stats`:
//!   job count and seconds (for Retry-After).
//! - `active`: the checkpoint `/sdapi/v1/options` chose for later requests, fleet-wide (no sticky
//!   sessions: every front reads it when a request arrives); `models`: a hash of the descriptions of
//!   every model a worker has loaded, by key; `checkpoints`: the workers' `--models-dir` list, so a
//!   front without the folders lists and resolves names. Each job carries its model's key, and the
//!   worker that takes it loads that model if it is not the one loaded.
//!
//! Delivery is at least once with an idempotent job id: a worker moves a job to `running` with a
//! script that refuses finished jobs, keeps its claim fresh while it runs, and stores the result,
//! publishes the final event and acknowledges the entry in one script that does nothing when the
//! job already ended, so a job that two workers ran (one presumed dead) is reported once. A worker
//! that dies leaves its entry pending; another takes it over with XAUTOCLAIM once it has been idle
//! for `--queue-claim-idle-secs`. A job that has taken down `--queue-max-attempts` workers fails.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamInfoConsumersReply, StreamRangeReply, StreamReadReply};
use redis::Script;
use serde_json::{json, Value};
use futures_util::StreamExt;
use tokio::sync::{broadcast, watch};

use crate::config::QueueConfig;
use crate::error::{ApiError, JobError};
use crate::jobs::{unix_now, Job, JobEvent, JobResult, JobSpec, JobStatus, Preview, Progress};
use crate::state::{AppState, ModelInfo, ModelState};
use crate::wire::WireSpec;

/// The consumer group every worker of a queue joins.
const GROUP: &str = "workers";
/// Events kept per job (approximately; Redis trims whole nodes).
const EVENTS_KEPT: usize = 64;
/// How often a worker polls its running job's cancel flag.
const POLL: Duration = Duration::from_millis(50);
/// Why a followed job ends when its hash disappears.
const STATE_GONE: &str = "the job's state is gone from the queue (expired or the Redis data was lost)";
/// Events read per request while following a job.
const EVENTS_PER_READ: usize = 256;
/// How often a front re-reads a followed job's events without a notification.
const FOLLOW_FALLBACK: Duration = Duration::from_secs(2);
/// How long the model description outlives the last worker's heartbeat.
const MODEL_TTL_SECS: u64 = 30;
/// A group member with no pending job silent this long (ms) belonged to a stopped worker.
const DEAD_CONSUMER_MS: usize = 3_600_000;
/// A worker not heard from for this long no longer counts as live.
const WORKER_STALE_SECS: u64 = 60;

/// Queues a job unless the stream is full: `nil` when full, else the entry id.
const SUBMIT: &str = r"
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'duplicate' end
redis.call('HSET', KEYS[2], 'id', ARGV[2], 'status', 'queued', 'operation', ARGV[4], 'created_at', ARGV[5],
  'parameters', ARGV[6], 'owner', ARGV[7], 'attempts', 0)
local e = redis.call('XADD', KEYS[1], '*', 'id', ARGV[2], 'spec', ARGV[3])
redis.call('HSET', KEYS[2], 'entry', e)
return e
";

/// Takes a job for a worker: `{verdict, attempts, parameters, owner}`; verdict `run` or `skip`.
const CLAIM: &str = r"
local s = redis.call('HGET', KEYS[1], 'status')
if not s or (s ~= 'queued' and s ~= 'running') then return {'skip', 0, '', ''} end
local a = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started_at', ARGV[2], 'entry', ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'event', 'status', 'data', 'running')
redis.call('PUBLISH', ARGV[5], ARGV[6])
return {'run', a, redis.call('HGET', KEYS[1], 'parameters'), redis.call('HGET', KEYS[1], 'owner') or ''}
";

/// Publishes progress or a preview while the caller still runs the job.
const PUBLISH: &str = r"
if redis.call('HGET', KEYS[1], 'status') ~= 'running' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[2], 'data', ARGV[4])
redis.call('PUBLISH', ARGV[6], ARGV[7])
return 1
";

/// Ends a job once: stores the outcome, publishes the final event, expires the keys and acks the entry.
const FINISH: &str = r"
local s = redis.call('HGET', KEYS[1], 'status')
local done = 0
if s and s ~= 'completed' and s ~= 'failed' and s ~= 'cancelled' then
  redis.call('HSET', KEYS[1], 'status', ARGV[1], ARGV[2], ARGV[3], 'finished_at', ARGV[4])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'event', ARGV[5], 'data', ARGV[6])
  redis.call('EXPIRE', KEYS[1], ARGV[8])
  redis.call('EXPIRE', KEYS[2], ARGV[8])
  if ARGV[1] == 'completed' then
    redis.call('HINCRBY', KEYS[4], 'jobs', 1)
    redis.call('HINCRBYFLOAT', KEYS[4], 'seconds', ARGV[10])
  end
  redis.call('PUBLISH', ARGV[11], ARGV[12])
  done = 1
end
redis.call('XACK', KEYS[3], 'workers', ARGV[9])
redis.call('XDEL', KEYS[3], ARGV[9])
return done
";

/// Puts a running job back at the end of the queue (a draining worker hands it back).
const HAND_BACK: &str = r"
redis.call('XACK', KEYS[2], 'workers', ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
if redis.call('HGET', KEYS[1], 'status') ~= 'running' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
local e = redis.call('XADD', KEYS[2], '*', 'id', ARGV[3], 'spec', ARGV[4])
redis.call('HSET', KEYS[1], 'status', 'queued', 'worker', '', 'entry', e)
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'event', 'status', 'data', 'queued')
redis.call('PUBLISH', ARGV[6], ARGV[3])
return 1
";

/// Cancels a job: at once when queued (`cancelled`), through the flag the running worker polls
/// (`running`), or not at all (`gone` or the final status).
const CANCEL: &str = r"
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return 'gone' end
if s == 'completed' or s == 'failed' or s == 'cancelled' then return s end
redis.call('HSET', KEYS[1], 'cancel', '1')
if s == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'error', ARGV[1], 'finished_at', ARGV[2])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'event', 'error', 'data', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  local e = redis.call('HGET', KEYS[1], 'entry')
  if e then redis.call('XDEL', KEYS[3], e) end
  redis.call('PUBLISH', ARGV[5], ARGV[6])
  return 'cancelled'
end
return 'running'
";

struct Scripts {
    submit: Script,
    claim: Script,
    publish: Script,
    finish: Script,
    hand_back: Script,
    cancel: Script,
}

/// A connection to the queue, shared by the HTTP handlers, the follower tasks and the consumer.
pub struct RedisQueue {
    client: redis::Client,
    conn: ConnectionManager,
    cfg: QueueConfig,
    capacity: usize,
    job_expiry: Duration,
    prefix: String,
    /// This process's consumer name in the group.
    pub consumer: String,
    scripts: Scripts,
    connected: AtomicBool,
    depth: AtomicUsize,
    live_workers: AtomicUsize,
    mean_job_secs: Mutex<Option<f64>>,
    draining: AtomicBool,
    consumer_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Per followed job, a counter bumped by each notification (a `watch` never loses one).
    wakers: Mutex<HashMap<String, watch::Sender<u64>>>,
    refreshes: AtomicUsize,
    /// The checkpoints the workers publish (what a front resolves names against).
    checkpoints: Mutex<Vec<crate::models::Checkpoint>>,
}

impl std::fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue").field("prefix", &self.prefix).field("consumer", &self.consumer).finish_non_exhaustive()
    }
}

fn redis_error(e: redis::RedisError) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "queue_unavailable", None, format!("the job queue (Redis) did not answer: {e}; retry shortly"))
        .with_retry_after(2)
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into())
}

impl RedisQueue {
    /// Opens (lazily: nothing is sent until the first command) the queue `cfg` names. Needs a
    /// Tokio runtime.
    /// `capacity` bounds the stream (the fleet's backlog); finished jobs stay `job_expiry`.
    pub fn open(cfg: QueueConfig, capacity: usize, job_expiry: Duration) -> Result<Self, String> {
        let client = redis::Client::open(cfg.url.as_str()).map_err(|e| format!("--queue {:?} is not a Redis URL: {e}", cfg.url))?;
        let manager_cfg = ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_cfg).map_err(|e| format!("cannot set up the Redis connection: {e}"))?;
        let suffix = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(unix_now());
            h.finish() & 0xffff_ffff
        };
        Ok(Self {
            client,
            conn,
            prefix: format!("sdw:{}:", cfg.name),
            consumer: format!("{}-{}-{suffix:08x}", hostname(), std::process::id()),
            cfg,
            capacity,
            job_expiry,
            scripts: Scripts {
                submit: Script::new(SUBMIT),
                claim: Script::new(CLAIM),
                publish: Script::new(PUBLISH),
                finish: Script::new(FINISH),
                hand_back: Script::new(HAND_BACK),
                cancel: Script::new(CANCEL),
            },
            connected: AtomicBool::new(false),
            depth: AtomicUsize::new(0),
            live_workers: AtomicUsize::new(0),
            mean_job_secs: Mutex::new(None),
            draining: AtomicBool::new(false),
            consumer_task: Mutex::new(None),
            wakers: Mutex::new(HashMap::new()),
            refreshes: AtomicUsize::new(0),
            checkpoints: Mutex::new(Vec::new()),
        })
    }

    /// The queue's settings.
    pub fn config(&self) -> &QueueConfig {
        &self.cfg
    }

    fn key(&self, what: &str) -> String {
        format!("{}{what}", self.prefix)
    }

    fn job_key(&self, id: &str) -> String {
        format!("{}job:{id}", self.prefix)
    }

    fn events_key(&self, id: &str) -> String {
        format!("{}events:{id}", self.prefix)
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Whether the last exchange with Redis worked.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    fn mark(&self, ok: bool) {
        if self.connected.swap(ok, Ordering::Relaxed) != ok {
            if ok {
                tracing::info!(queue = %self.cfg.name, "queue connected");
            } else {
                tracing::warn!(queue = %self.cfg.name, "queue unreachable");
            }
        }
    }

    /// Jobs in the stream (queued or running, fleet-wide) at the last refresh.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// Workers heard from in the last minute, at the last refresh.
    pub fn live_workers(&self) -> usize {
        self.live_workers.load(Ordering::Relaxed)
    }

    /// The checkpoints the fleet's workers listed at the last refresh.
    pub fn checkpoints(&self) -> Vec<crate::models::Checkpoint> {
        lock(&self.checkpoints).clone()
    }

    /// The fleet's chosen model: its key (`None` until `/sdapi/v1/options` picked one) and its description
    /// once a worker has loaded it.
    pub async fn active_model(&self) -> Result<(Option<String>, Option<ModelInfo>), ApiError> {
        let mut conn = self.conn();
        let key: Option<String> = redis::cmd("GET").arg(self.key("active")).query_async(&mut conn).await.map_err(redis_error)?;
        let Some(key) = key else { return Ok((None, None)) };
        let info: Option<String> = redis::cmd("HGET").arg(self.key("models")).arg(&key).query_async(&mut conn).await.map_err(redis_error)?;
        Ok((Some(key), info.and_then(|t| serde_json::from_str(&t).ok())))
    }

    /// The description a worker published for the model `key`, if any.
    pub async fn described_model(&self, key: &str) -> Result<Option<ModelInfo>, ApiError> {
        let info: Option<String> = redis::cmd("HGET").arg(self.key("models")).arg(key).query_async(&mut self.conn()).await.map_err(redis_error)?;
        Ok(info.and_then(|t| serde_json::from_str(&t).ok()))
    }

    /// Makes `key` the fleet's model for later requests, with its description when this process has it.
    pub async fn set_active_model(&self, key: &str, info: Option<&ModelInfo>) -> Result<(), ApiError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(self.key("active")).arg(key).ignore();
        if let Some(info) = info {
            pipe.cmd("HSET").arg(self.key("models")).arg(key).arg(serde_json::to_string(info).unwrap_or_default()).ignore();
            pipe.cmd("EXPIRE").arg(self.key("models")).arg(MODEL_TTL_SECS).ignore();
        }
        pipe.query_async::<()>(&mut self.conn()).await.map_err(redis_error)
    }

    /// Stops this process from taking more jobs.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    async fn ensure_group(&self) -> redis::RedisResult<()> {
        let r: redis::RedisResult<()> =
            redis::cmd("XGROUP").arg("CREATE").arg(self.key("jobs")).arg(GROUP).arg("0").arg("MKSTREAM").query_async(&mut self.conn()).await;
        match r {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// Queues `spec` as job `id` for `owner`; the returned job mirrors the fleet's state of it.
    pub async fn submit(self: Arc<Self>, state: &Arc<AppState>, id: String, spec: JobSpec, parameters: Value, owner: Option<String>) -> Result<Arc<Job>, ApiError> {
        let operation = spec.operation.name();
        let st = state.clone();
        // PNG encoding of large inputs is CPU work: off the async workers.
        let wire = tokio::task::spawn_blocking(move || WireSpec::encode(&spec, &st.loras, &st.controlnets).and_then(|w| serde_json::to_string(&w).map_err(|e| e.to_string())))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", None, e.to_string()))?
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", None, e))?;
        let created_at = unix_now();
        let r: redis::RedisResult<Option<String>> = self
            .scripts
            .submit
            .key(self.key("jobs"))
            .key(self.job_key(&id))
            .arg(self.capacity)
            .arg(&id)
            .arg(&wire)
            .arg(operation)
            .arg(created_at)
            .arg(parameters.to_string())
            .arg(owner.clone().unwrap_or_default())
            .invoke_async(&mut self.conn())
            .await;
        let entry = match r {
            Ok(e) => {
                self.mark(true);
                e
            }
            Err(e) => {
                self.mark(false);
                return Err(redis_error(e));
            }
        };
        let Some(entry) = entry else {
            state.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            let workers = self.live_workers().max(1) as f64;
            let per_job = lock(&self.mean_job_secs).unwrap_or(5.0);
            let wait = (per_job * (self.capacity as f64 + 1.0) / workers).ceil().clamp(1.0, 3600.0) as u64;
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                None,
                format!("the fleet's queue holds {} jobs (its capacity); retry after the Retry-After seconds", self.capacity),
            )
            .with_retry_after(wait));
        };
        if entry == "duplicate" {
            return Err(ApiError::new(StatusCode::CONFLICT, "duplicate_job", None, format!("job {id} exists already")));
        }
        tracing::info!(job_id = %id, operation, entry = %entry, "job queued on the fleet");
        let job = Arc::new(Job::mirror(id, operation, created_at, parameters, owner));
        Ok(state.adopt_mirror(job, "0-0".into()))
    }

    /// The fleet's job `id` as a local mirror, if Redis has it.
    pub async fn load(&self, state: &Arc<AppState>, id: &str) -> Result<Option<Arc<Job>>, ApiError> {
        let fields: redis::RedisResult<Vec<Option<String>>> = redis::cmd("HMGET")
            .arg(self.job_key(id))
            .arg(&["status", "operation", "created_at", "parameters", "owner"])
            .query_async(&mut self.conn())
            .await;
        let fields = fields.map_err(|e| {
            self.mark(false);
            redis_error(e)
        })?;
        let [status, operation, created_at, parameters, owner]: [Option<String>; 5] = match fields.try_into() {
            Ok(a) => a,
            Err(_) => return Ok(None),
        };
        if status.is_none() {
            return Ok(None);
        }
        let operation = match operation.as_deref() {
            Some("image_transform") => "image_transform",
            Some("image_inpaint") => "image_inpaint",
            _ => "image_generation",
        };
        let parameters = parameters.and_then(|p| serde_json::from_str(&p).ok()).unwrap_or(Value::Null);
        let created_at = created_at.and_then(|c| c.parse().ok()).unwrap_or(0);
        let owner = owner.filter(|o| !o.is_empty());
        let job = Arc::new(Job::mirror(id.to_string(), operation, created_at, parameters, owner));
        // The first answer about the job reflects what Redis holds, not an empty mirror.
        let mut last = "0-0".to_string();
        while self.read_events(&job, &mut last).await.map_err(redis_error)? == EVENTS_PER_READ {}
        Ok(Some(state.adopt_mirror(job, last)))
    }

    /// Asks the fleet to cancel job `id`.
    pub async fn cancel(&self, id: &str, err: &JobError) -> Result<String, ApiError> {
        let data = error_data(err, JobStatus::Cancelled);
        let r: redis::RedisResult<String> = self
            .scripts
            .cancel
            .key(self.job_key(id))
            .key(self.events_key(id))
            .key(self.key("jobs"))
            .arg(data)
            .arg(unix_now())
            .arg(self.job_expiry.as_secs().max(1))
            .arg(EVENTS_KEPT)
            .arg(self.key("notify"))
            .arg(id)
            .invoke_async(&mut self.conn())
            .await;
        r.map_err(redis_error)
    }

    /// Follows job `id`'s events into the local mirror `job` until it ends.
    pub async fn follow(self: Arc<Self>, job: Arc<Job>, mut last: String) {
        let mut wake = self.waker(&job.id);
        let mut failures = 0u32;
        while !job.status().is_terminal() {
            match self.read_events(&job, &mut last).await {
                Ok(n) => {
                    failures = 0;
                    if n < EVENTS_PER_READ {
                        // Woken by the job's notification; the timeout covers a notification lost
                        // while the subscription was reconnecting.
                        let _ = tokio::time::timeout(FOLLOW_FALLBACK, wake.changed()).await;
                    }
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(job_id = %job.id, error = %e, "cannot read the job's events; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        drop(wake);
        self.release(&job.id);
    }

    /// A receiver that changes whenever job `id` is notified.
    fn waker(&self, id: &str) -> watch::Receiver<u64> {
        let mut w = lock(&self.wakers);
        match w.get(id) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(0);
                w.insert(id.to_string(), tx);
                rx
            }
        }
    }

    /// Forgets job `id`'s waker once nobody listens.
    fn release(&self, id: &str) {
        let mut w = lock(&self.wakers);
        if w.get(id).is_some_and(|tx| tx.receiver_count() == 0) {
            w.remove(id);
        }
    }

    /// The job's events after `after` (a stream id from `Last-Event-ID`, or the start) as SSE
    /// `(id, event, data)`, following the job until its final event; `status` events stay internal.
    pub fn event_stream(self: Arc<Self>, id: String, after: Option<String>) -> impl futures_util::Stream<Item = (String, &'static str, String)> + Send {
        let wake = self.waker(&id);
        let last = after.unwrap_or_else(|| "0-0".into());
        struct S {
            q: Arc<RedisQueue>,
            id: String,
            last: String,
            wake: Option<watch::Receiver<u64>>,
            pending: VecDeque<(String, &'static str, String)>,
            done: bool,
        }
        impl Drop for S {
            fn drop(&mut self) {
                // Dropped first, so `release` counts the listeners left.
                self.wake = None;
                self.q.release(&self.id);
            }
        }
        let state = S { q: self, id, last, wake: Some(wake), pending: VecDeque::new(), done: false };
        futures_util::stream::unfold(state, |mut s| async move {
            loop {
                if let Some(ev) = s.pending.pop_front() {
                    return Some((ev, s));
                }
                if s.done {
                    return None;
                }
                let (range, status) = match s.q.events_after(&s.id, &s.last).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(job_id = %s.id, error = %e, "cannot read the job's events for a stream; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                for entry in &range.ids {
                    s.last = entry.id.clone();
                    let event: String = entry.get("event").unwrap_or_default();
                    let data: String = entry.get("data").unwrap_or_default();
                    let (name, data) = match event.as_str() {
                        "progress" => ("progress", data),
                        "preview" => ("preview", data),
                        "error" => {
                            s.done = true;
                            let v: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                            ("error", json!({"code": v["code"], "message": v["message"], "field": v["field"]}).to_string())
                        }
                        "complete" => {
                            s.done = true;
                            ("complete", s.q.stored_result(&s.id).await.unwrap_or_else(|| "null".into()))
                        }
                        _ => continue,
                    };
                    s.pending.push_back((entry.id.clone(), name, data));
                    if s.done {
                        break;
                    }
                }
                if s.pending.is_empty() && !s.done {
                    if status.is_none() {
                        s.done = true;
                        let data = json!({"code": "internal_error", "message": STATE_GONE});
                        s.pending.push_back((s.last.clone(), "error", data.to_string()));
                    } else if range.ids.len() < EVENTS_PER_READ {
                        if let Some(w) = s.wake.as_mut() {
                            let _ = tokio::time::timeout(FOLLOW_FALLBACK, w.changed()).await;
                        }
                    }
                }
            }
        })
    }

    /// Up to [`EVENTS_PER_READ`] of job `id`'s events after stream id `last`, and its status
    /// (`None`: the job's hash is gone).
    async fn events_after(&self, id: &str, last: &str) -> redis::RedisResult<(StreamRangeReply, Option<String>)> {
        redis::pipe()
            .cmd("XRANGE")
            .arg(self.events_key(id))
            .arg(format!("({last}"))
            .arg("+")
            .arg("COUNT")
            .arg(EVENTS_PER_READ)
            .cmd("HGET")
            .arg(self.job_key(id))
            .arg("status")
            .query_async(&mut self.conn())
            .await
    }

    /// Job `id`'s stored result (JSON with the images), kept once in its hash rather than in the event.
    async fn stored_result(&self, id: &str) -> Option<String> {
        let r: redis::RedisResult<Option<String>> = redis::cmd("HGET").arg(self.job_key(id)).arg("result").query_async(&mut self.conn()).await;
        r.ok().flatten()
    }

    /// Applies the job's events after `last` to the mirror; returns how many it read.
    async fn read_events(&self, job: &Job, last: &mut String) -> redis::RedisResult<usize> {
        let (range, status) = self.events_after(&job.id, last).await?;
        for entry in &range.ids {
            *last = entry.id.clone();
            self.apply(job, entry).await;
        }
        if status.is_none() && !job.status().is_terminal() && range.ids.is_empty() {
            job.finish_error(JobStatus::Failed, JobError::new("internal_error", STATE_GONE));
        }
        Ok(range.ids.len())
    }

    async fn apply(&self, job: &Job, entry: &StreamId) {
        let event: String = entry.get("event").unwrap_or_default();
        let data: String = entry.get("data").unwrap_or_default();
        match event.as_str() {
            "status" if data == "running" => job.set_running(),
            "status" if data == "queued" => job.requeue(),
            "progress" => {
                if let Ok(p) = serde_json::from_str::<Progress>(&data) {
                    job.publish_progress(p.step, p.total);
                }
            }
            "preview" => {
                if let Ok(v) = serde_json::from_str::<Value>(&data) {
                    let preview = Preview {
                        step: v["step"].as_u64().unwrap_or(0) as usize,
                        image: v["image"].as_str().unwrap_or_default().to_string(),
                        mime: "image/png",
                        width: v["width"].as_u64().unwrap_or(0) as u32,
                        height: v["height"].as_u64().unwrap_or(0) as u32,
                    };
                    job.publish_preview(preview);
                }
            }
            "complete" => {
                match self.stored_result(&job.id).await.and_then(|s| serde_json::from_str::<JobResult>(&s).ok()) {
                    Some(result) => job.finish_ok(result),
                    None => job.finish_error(JobStatus::Failed, JobError::new("internal_error", "the job completed but its result could not be read from the queue")),
                }
            }
            "error" => {
                let v: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                let status = if v["status"] == "cancelled" { JobStatus::Cancelled } else { JobStatus::Failed };
                let field = v["field"].as_str().map(str::to_string);
                job.finish_error(status, JobError::from_parts(v["code"].as_str().unwrap_or(""), v["message"].as_str().unwrap_or("the job failed"), field));
            }
            _ => {}
        }
    }

    /// Wakes the followers of the jobs named on the `notify` channel (every script that changes a
    /// job publishes its id there), resubscribing after a lost connection.
    pub async fn notify_loop(self: Arc<Self>) {
        loop {
            if let Ok(mut ps) = self.client.get_async_pubsub().await {
                if ps.subscribe(self.key("notify")).await.is_ok() {
                    // Anything published while unsubscribed is read now.
                    for w in lock(&self.wakers).values() {
                        w.send_modify(|n| *n = n.wrapping_add(1));
                    }
                    let mut messages = ps.into_on_message();
                    while let Some(msg) = messages.next().await {
                        if let Ok(id) = msg.get_payload::<String>() {
                            if let Some(w) = lock(&self.wakers).get(&id) {
                                w.send_modify(|n| *n = n.wrapping_add(1));
                            }
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Keeps the fleet's view fresh: a worker registers its model and heartbeat; every process
    /// reads the backlog, the live workers and (a front without a model) the model description.
    pub async fn refresh_loop(self: Arc<Self>, state: Arc<AppState>, has_engine: bool) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            let ok = self.refresh(&state, has_engine).await;
            if let Err(e) = &ok {
                tracing::debug!(error = %e, "queue refresh failed");
            }
            self.mark(ok.is_ok());
        }
    }

    async fn refresh(&self, state: &AppState, has_engine: bool) -> redis::RedisResult<()> {
        self.ensure_group().await?;
        let now = unix_now();
        let mut conn = self.conn();
        if has_engine {
            // Every model this worker described, for fronts validating requests switched to them, and the
            // checkpoints it can load.
            let infos = state.known_models();
            let list: Vec<crate::models::Checkpoint> =
                state.catalog.list().into_iter().map(|c| crate::models::Checkpoint { sha256: c.cached_sha256(), ..c }).collect();
            let mut pipe = redis::pipe();
            for info in &infos {
                pipe.cmd("HSET").arg(self.key("models")).arg(&info.key).arg(serde_json::to_string(&**info).unwrap_or_default()).ignore();
            }
            if !infos.is_empty() {
                pipe.cmd("EXPIRE").arg(self.key("models")).arg(MODEL_TTL_SECS).ignore();
            }
            if !list.is_empty() {
                pipe.cmd("HSET").arg(self.key("checkpoints")).arg(&self.consumer).arg(serde_json::to_string(&list).unwrap_or_default()).ignore();
                pipe.cmd("EXPIRE").arg(self.key("checkpoints")).arg(MODEL_TTL_SECS).ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
            if let Some(info) = state.model_info(&state.primary_key) {
                let current: Option<String> = redis::cmd("GET").arg(self.key("model")).query_async(&mut conn).await?;
                if let Some(other) = current.and_then(|c| serde_json::from_str::<ModelInfo>(&c).ok()) {
                    if (other.name.as_str(), other.caps.variant.as_str()) != (info.name.as_str(), info.caps.variant.as_str()) {
                        tracing::error!(queue = %self.cfg.name, mine = %info.name, other = %other.name,
                            "another worker serves a different model on this queue; give each model its own --queue-name");
                    }
                }
                let text = serde_json::to_string(&*info).unwrap_or_default();
                redis::pipe()
                    .cmd("SET")
                    .arg(self.key("model"))
                    .arg(text)
                    .arg("EX")
                    .arg(MODEL_TTL_SECS)
                    .ignore()
                    .cmd("ZADD")
                    .arg(self.key("workers"))
                    .arg(now)
                    .arg(&self.consumer)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await?;
            }
        }
        type Fleet = (usize, usize, (Option<f64>, Option<f64>), Option<String>, Option<String>, HashMap<String, String>);
        // About once a minute a worker forgets group members of workers long gone.
        if has_engine && self.refreshes.fetch_add(1, Ordering::Relaxed) % 30 == 0 {
            self.forget_dead_consumers().await?;
        }
        let (depth, live, stats, model, active, checkpoints): Fleet = redis::pipe()
            .cmd("ZREMRANGEBYSCORE")
            .arg(self.key("workers"))
            .arg("-inf")
            .arg(now.saturating_sub(WORKER_STALE_SECS))
            .ignore()
            .cmd("XLEN")
            .arg(self.key("jobs"))
            .cmd("ZCARD")
            .arg(self.key("workers"))
            .cmd("HMGET")
            .arg(self.key("stats"))
            .arg("jobs")
            .arg("seconds")
            .cmd("GET")
            .arg(self.key("model"))
            .cmd("GET")
            .arg(self.key("active"))
            .cmd("HGETALL")
            .arg(self.key("checkpoints"))
            .query_async(&mut conn)
            .await?;
        // The union of the live workers' lists (each worker publishes its own under its consumer name).
        let mut union: Vec<crate::models::Checkpoint> = Vec::new();
        for list in checkpoints.values().filter_map(|t| serde_json::from_str::<Vec<crate::models::Checkpoint>>(t).ok()) {
            for c in list {
                if !union.iter().any(|u| u.name == c.name) {
                    union.push(c);
                }
            }
        }
        union.sort_by(|a, b| a.name.cmp(&b.name));
        *lock(&self.checkpoints) = union;
        self.depth.store(depth, Ordering::Relaxed);
        self.live_workers.store(live, Ordering::Relaxed);
        if let (Some(n), Some(s)) = stats {
            if n > 0.0 {
                *lock(&self.mean_job_secs) = Some(s / n);
            }
        }
        if !has_engine {
            // A front without a model serves what the fleet's workers describe: the checkpoint chosen
            // through /sdapi/v1/options once a worker described it, else the workers' own model. (A worker
            // keeps its engine's state; its requests read the choice from Redis as they arrive.)
            let chosen = match active {
                Some(key) => {
                    let described: Option<String> = redis::cmd("HGET").arg(self.key("models")).arg(&key).query_async(&mut conn).await?;
                    described.and_then(|t| serde_json::from_str::<ModelInfo>(&t).ok())
                }
                None => None,
            };
            let fleet = model.and_then(|m| serde_json::from_str::<ModelInfo>(&m).ok());
            // Both stay known here, so requests naming either validate without asking Redis again.
            for info in fleet.iter().chain(&chosen) {
                if state.model_info(&info.key).as_deref() != Some(info) {
                    state.remember_model(Arc::new(info.clone()));
                }
            }
            match fleet.map(|own| chosen.unwrap_or(own)) {
                Some(info) => {
                    let changed = !matches!(state.model_state(), ModelState::Ready(old) if *old == info);
                    if changed {
                        tracing::info!(model = %info.name, variant = %info.caps.variant, "the fleet serves this model");
                        state.set_model_state(ModelState::Ready(Arc::new(info)));
                    }
                }
                None => {
                    if matches!(state.model_state(), ModelState::Ready(_)) {
                        tracing::warn!("no worker has registered on the queue for a while");
                        state.set_model_state(ModelState::Loading);
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes the group's consumers that hold no job and have been silent for an hour (every
    /// worker start adds one; a consumer with pending jobs stays until they are taken over).
    async fn forget_dead_consumers(&self) -> redis::RedisResult<()> {
        let mut conn = self.conn();
        let info: StreamInfoConsumersReply = redis::cmd("XINFO").arg("CONSUMERS").arg(self.key("jobs")).arg(GROUP).query_async(&mut conn).await?;
        for c in info.consumers.iter().filter(|c| c.name != self.consumer && c.pending == 0 && c.idle > DEAD_CONSUMER_MS) {
            redis::cmd("XGROUP").arg("DELCONSUMER").arg(self.key("jobs")).arg(GROUP).arg(&c.name).query_async::<i64>(&mut conn).await?;
            tracing::info!(consumer = %c.name, "forgot a worker that stopped an hour ago");
        }
        Ok(())
    }

    /// Starts taking jobs from the stream onto this process's engine.
    pub fn spawn_consumer(self: &Arc<Self>, state: Arc<AppState>) {
        let q = self.clone();
        let handle = tokio::spawn(async move { q.consume(state).await });
        *lock(&self.consumer_task) = Some(handle);
    }

    /// Waits (up to `limit`) for the consumer to finish reporting its last job.
    pub async fn join_consumer(&self, limit: Duration) {
        let handle = lock(&self.consumer_task).take();
        if let Some(h) = handle {
            if tokio::time::timeout(limit, h).await.is_err() {
                tracing::warn!("the queue consumer did not stop in time");
            }
        }
    }

    async fn blocking_connection(&self, block: Duration) -> redis::RedisResult<MultiplexedConnection> {
        // XREADGROUP BLOCK holds the connection: it gets its own, with a timeout beyond the block.
        let cfg = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(block + Duration::from_secs(5)))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        self.client.get_multiplexed_async_connection_with_config(&cfg).await
    }

    async fn consume(&self, state: Arc<AppState>) {
        let block = Duration::from_millis(1000);
        let mut reader: Option<MultiplexedConnection> = None;
        loop {
            if self.draining.load(Ordering::SeqCst) {
                break;
            }
            match state.model_state() {
                ModelState::Ready(_) => {}
                ModelState::Loading => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                ModelState::Failed(_) => break,
            }
            let next = self.next_entry(&mut reader, block).await;
            match next {
                Ok(Some(entry)) => {
                    self.mark(true);
                    self.process(&state, entry).await;
                }
                Ok(None) => self.mark(true),
                Err(e) => {
                    self.mark(false);
                    reader = None;
                    tracing::warn!(error = %e, "cannot read the job queue; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        tracing::info!("queue consumer stopped");
    }

    /// A job whose worker went quiet, else a new one (waiting up to `block`).
    async fn next_entry(&self, reader: &mut Option<MultiplexedConnection>, block: Duration) -> redis::RedisResult<Option<StreamId>> {
        self.ensure_group().await?;
        let idle = self.cfg.claim_idle.as_millis() as u64;
        let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(self.key("jobs"))
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(idle)
            .arg("0-0")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.conn())
            .await?;
        if let Some(entry) = claimed.claimed.into_iter().next() {
            tracing::info!(entry = %entry.id, "took over a job whose worker stopped answering");
            return Ok(Some(entry));
        }
        if reader.is_none() {
            *reader = Some(self.blocking_connection(block).await?);
        }
        let Some(conn) = reader.as_mut() else { return Ok(None) };
        let read: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(self.key("jobs"))
            .arg(">")
            .query_async(conn)
            .await?;
        Ok(read.and_then(|r| r.keys.into_iter().next()).and_then(|k| k.ids.into_iter().next()))
    }

    async fn ack(&self, entry: &str) {
        let r: redis::RedisResult<()> = redis::pipe()
            .cmd("XACK")
            .arg(self.key("jobs"))
            .arg(GROUP)
            .arg(entry)
            .ignore()
            .cmd("XDEL")
            .arg(self.key("jobs"))
            .arg(entry)
            .ignore()
            .query_async(&mut self.conn())
            .await;
        if let Err(e) = r {
            tracing::warn!(entry, error = %e, "cannot acknowledge a queue entry");
        }
    }

    /// Stores a job's outcome and acknowledges its entry (retrying while Redis is away: the result
    /// must not be lost once computed).
    async fn finish(&self, id: &str, entry: &str, outcome: Result<Arc<JobResult>, (JobStatus, JobError)>, secs: f64) {
        let (status, field, payload, event, data) = match &outcome {
            Ok(r) => ("completed", "result", serde_json::to_string(&**r).unwrap_or_default(), "complete", String::new()),
            Err((status, e)) => {
                let d = error_data(e, *status);
                (status.as_str(), "error", d.clone(), "error", d)
            }
        };
        for attempt in 0..30u32 {
            let r: redis::RedisResult<i64> = self
                .scripts
                .finish
                .key(self.job_key(id))
                .key(self.events_key(id))
                .key(self.key("jobs"))
                .key(self.key("stats"))
                .arg(status)
                .arg(field)
                .arg(&payload)
                .arg(unix_now())
                .arg(event)
                .arg(&data)
                .arg(EVENTS_KEPT)
                .arg(self.job_expiry.as_secs().max(1))
                .arg(entry)
                .arg(secs)
                .arg(self.key("notify"))
                .arg(id)
                .invoke_async(&mut self.conn())
                .await;
            match r {
                Ok(1) => return,
                Ok(_) => {
                    tracing::info!(job_id = id, "the job had already ended elsewhere; this outcome is dropped");
                    return;
                }
                Err(e) => {
                    tracing::warn!(job_id = id, attempt, error = %e, "cannot store the job's outcome; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        tracing::error!(job_id = id, "gave up storing the job's outcome; another worker will run it again");
    }

    async fn process(&self, state: &Arc<AppState>, entry: StreamId) {
        let (Some(id), Some(spec_text)) = (entry.get::<String>("id"), entry.get::<String>("spec")) else {
            tracing::warn!(entry = %entry.id, "malformed queue entry dropped");
            self.ack(&entry.id).await;
            return;
        };
        let claim: redis::RedisResult<(String, i64, String, String)> = self
            .scripts
            .claim
            .key(self.job_key(&id))
            .key(self.events_key(&id))
            .arg(&self.consumer)
            .arg(unix_now())
            .arg(&entry.id)
            .arg(EVENTS_KEPT)
            .arg(self.key("notify"))
            .arg(&id)
            .invoke_async(&mut self.conn())
            .await;
        let (verdict, attempts, parameters, owner) = match claim {
            Ok(c) => c,
            Err(e) => {
                // Left pending: this worker (or another, after the idle time) takes it again.
                tracing::warn!(job_id = %id, error = %e, "cannot claim a job");
                return;
            }
        };
        if verdict != "run" {
            tracing::debug!(job_id = %id, "skipping a job that already ended");
            self.ack(&entry.id).await;
            return;
        }
        if attempts > i64::from(self.cfg.max_attempts) {
            let msg = format!(
                "the job was started {} times and each worker running it stopped (crashed or was killed); it is not retried again",
                attempts - 1
            );
            tracing::warn!(job_id = %id, "{msg}");
            self.finish(&id, &entry.id, Err((JobStatus::Failed, JobError::new("worker_lost", msg))), 0.0).await;
            return;
        }
        let st = state.clone();
        let text = spec_text.clone();
        let decoded = tokio::task::spawn_blocking(move || {
            let wire: WireSpec = serde_json::from_str(&text).map_err(|e| JobError::new("internal_error", format!("the queued job is unreadable: {e}")))?;
            wire.decode(&st.loras, &st.controlnets, &st.upscalers)
        })
        .await
        .unwrap_or_else(|e| Err(JobError::new("internal_error", e.to_string())));
        let spec = match decoded.and_then(|s| within_limits(&state.config.limits, s)) {
            Ok(s) => s,
            Err(e) => {
                self.finish(&id, &entry.id, Err((JobStatus::Failed, e)), 0.0).await;
                return;
            }
        };
        let parameters: Value = serde_json::from_str(&parameters).unwrap_or(Value::Null);
        let owner = (!owner.is_empty()).then_some(owner);
        let job = Arc::new(Job::new(id.clone(), spec, parameters, owner));
        let (_, rx) = job.subscribe();
        let t0 = Instant::now();
        if self.draining.load(Ordering::SeqCst) || !state.run_local(job.clone()) {
            self.hand_back(&id, &entry.id, &spec_text).await;
            return;
        }
        tracing::info!(job_id = %id, attempt = attempts, "fleet job started");
        let outcome = self.watch(state, &job, rx, &entry.id).await;
        match outcome {
            Watched::Ended(outcome) => self.finish(&id, &entry.id, outcome, t0.elapsed().as_secs_f64()).await,
            Watched::HandBack => self.hand_back(&id, &entry.id, &spec_text).await,
            Watched::Lost => {}
        }
    }

    /// Relays the local run's events to Redis, relays a cancel from Redis to the run, and keeps
    /// the claim on the entry fresh, until the run ends.
    async fn watch(&self, state: &AppState, job: &Arc<Job>, mut rx: broadcast::Receiver<JobEvent>, entry: &str) -> Watched {
        let mut poll = tokio::time::interval(POLL * 2);
        let mut heartbeat = tokio::time::interval(heartbeat_period(self.cfg.claim_idle));
        let mut user_cancel = false;
        let mut lost = false;
        let mut pending: VecDeque<JobEvent> = VecDeque::new();
        loop {
            while let Some(ev) = pending.pop_front() {
                match ev {
                    JobEvent::Progress(p) => self.publish(&job.id, "progress", &p).await,
                    JobEvent::Preview(p) => self.publish(&job.id, "preview", &*p).await,
                    JobEvent::Complete(_) | JobEvent::Error(_) if lost => return Watched::Lost,
                    JobEvent::Complete(r) => return Watched::Ended(Ok(r)),
                    JobEvent::Error(e) => {
                        let status = job.status();
                        // Stopped by this worker's shutdown, not by a client: another worker runs it.
                        if !user_cancel && state.is_shutting_down() && status == JobStatus::Cancelled {
                            return Watched::HandBack;
                        }
                        return Watched::Ended(Err((if status == JobStatus::Cancelled { JobStatus::Cancelled } else { JobStatus::Failed }, e)));
                    }
                }
            }
            tokio::select! {
                ev = rx.recv() => match ev {
                    Ok(ev) => pending.push_back(ev),
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {
                        return Watched::Ended(Err((JobStatus::Failed, JobError::new("internal_error", "the engine dropped the job"))));
                    }
                },
                _ = poll.tick() => {
                    if !user_cancel {
                        let flag: redis::RedisResult<Option<String>> =
                            redis::cmd("HGET").arg(self.job_key(&job.id)).arg("cancel").query_async(&mut self.conn()).await;
                        if matches!(flag.as_ref().map(Option::as_deref), Ok(Some("1"))) {
                            user_cancel = true;
                            tracing::info!(job_id = %job.id, "cancel requested through the queue");
                            if job.request_cancel() {
                                // Not yet on the engine: it will skip the job.
                                job.finish_error(JobStatus::Cancelled, JobError::new("cancelled", "cancelled by request"));
                            }
                        }
                    }
                }
                _ = heartbeat.tick(), if !lost => {
                    let owner: redis::RedisResult<Option<String>> =
                        redis::cmd("HGET").arg(self.job_key(&job.id)).arg("worker").query_async(&mut self.conn()).await;
                    match owner {
                        Ok(Some(w)) if w != self.consumer => {
                            // This worker was presumed dead (a pause longer than the idle time) and another
                            // took the job over: stop, and leave the outcome to that one.
                            tracing::warn!(job_id = %job.id, other = %w, "another worker took this job over; stopping it here");
                            lost = true;
                            if job.request_cancel() {
                                job.finish_error(JobStatus::Cancelled, JobError::new("cancelled", "taken over by another worker"));
                            }
                            continue;
                        }
                        _ => {}
                    }
                    // Resets the entry's idle time so no other worker takes it over while this one runs it.
                    let r: redis::RedisResult<Vec<String>> = redis::cmd("XCLAIM")
                        .arg(self.key("jobs")).arg(GROUP).arg(&self.consumer).arg(0).arg(entry).arg("JUSTID")
                        .query_async(&mut self.conn()).await;
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "cannot refresh the claim on the running job");
                    }
                }
            }
        }
    }

    async fn publish<T: serde::Serialize>(&self, id: &str, what: &str, value: &T) {
        let text = serde_json::to_string(value).unwrap_or_default();
        let r: redis::RedisResult<i64> = self
            .scripts
            .publish
            .key(self.job_key(id))
            .key(self.events_key(id))
            .arg(&self.consumer)
            .arg(what)
            .arg(&text)
            .arg(&text)
            .arg(EVENTS_KEPT)
            .arg(self.key("notify"))
            .arg(id)
            .invoke_async(&mut self.conn())
            .await;
        if let Err(e) = r {
            tracing::debug!(error = %e, "cannot publish {what}");
        }
    }

    async fn hand_back(&self, id: &str, entry: &str, spec: &str) {
        let r: redis::RedisResult<i64> = self
            .scripts
            .hand_back
            .key(self.job_key(id))
            .key(self.key("jobs"))
            .key(self.events_key(id))
            .arg(&self.consumer)
            .arg(entry)
            .arg(id)
            .arg(spec)
            .arg(EVENTS_KEPT)
            .arg(self.key("notify"))
            .invoke_async(&mut self.conn())
            .await;
        match r {
            Ok(_) => tracing::info!(job_id = id, "handed the job back to the queue"),
            // Still pending under this consumer: another worker takes it over after the idle time.
            Err(e) => tracing::warn!(job_id = id, error = %e, "cannot hand the job back; another worker will take it over"),
        }
    }
}

enum Watched {
    /// Store this outcome.
    Ended(Result<Arc<JobResult>, (JobStatus, JobError)>),
    /// Put the job back in the queue (this worker is draining).
    HandBack,
    /// Another worker owns the job now; report nothing.
    Lost,
}

/// How often a running job's claim is renewed: at most every 5 s, and at least three times per
/// claim idle period, so a live worker's job is never taken over.
pub fn heartbeat_period(claim_idle: Duration) -> Duration {
    (claim_idle / 3).min(Duration::from_secs(5)).max(Duration::from_millis(50))
}

/// Whether `s` is a Redis stream entry id (`<ms>-<seq>`), as SSE `Last-Event-ID` carries it.
pub fn is_stream_id(s: &str) -> bool {
    let mut parts = s.splitn(2, '-');
    let ok = |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit()));
    ok(parts.next()) && ok(parts.next())
}

/// Holds a queued job to this worker's own limits (a front may have been configured with larger ones).
fn within_limits(limits: &crate::config::Limits, spec: JobSpec) -> Result<JobSpec, JobError> {
    let p = &spec.params;
    let checks = [("width", p.width, limits.max_width), ("height", p.height, limits.max_height), ("steps", p.steps, limits.max_steps), ("batch", p.batch_size, limits.max_batch)];
    for (field, v, max) in checks {
        if v > max {
            return Err(JobError {
                code: "invalid_request",
                message: format!("{v} is above this worker's limit of {max}; give the fronts the workers' limits"),
                field: Some(field.into()),
            });
        }
    }
    Ok(spec)
}

fn error_data(e: &JobError, status: JobStatus) -> String {
    json!({"code": e.code, "message": e.message, "field": e.field, "status": status.as_str()}).to_string()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
