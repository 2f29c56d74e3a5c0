//! Shared pieces of the benchmark runners in `src/bin/`.
//!
//! These machines are noisy, so no runner reports an absolute time on its own: every variant is run
//! in interleaved rounds against the same data, and what is reported is the median, over rounds, of
//! each variant's ratio to the baseline measured in the same round. Each round starts one variant
//! further (A B C, B C A, C A B, ...), so that whatever a position in the round does to a run (first
//! after a pause, right after a given variant) does not fall on the same variant in every round.
//!
//! Runners are started through `benches/run NAME`, which installs a release build of the extension
//! into a private PostgreSQL tree and points `PG_CONFIG` at it before the runner starts.

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tenant_scale_harness::{Cluster, pg_bindir};

/// One pgbench run: a custom script (pgbench syntax) against `cluster`, `clients` connections on as
/// many threads, for `duration`. Returns transactions per second. pgbench stops a client at its first
/// SQL error, so scripts must not fail.
pub fn pgbench(cluster: &Cluster, script: &str, clients: u32, duration: Duration) -> Result<f64> {
    let report =
        run_pgbench(cluster, script, clients, &["-T".into(), duration.as_secs().max(1).to_string()])?;
    parse_tps(&report).with_context(|| format!("no tps line in pgbench output:\n{report}"))
}

/// Like [`pgbench`], but `transactions` per client, and also what the server spent on them: returns
/// (tps, transactions per second of server CPU time). The second figure barely moves when other
/// processes compete for the machine, where tps does: it is the one to compare on a shared machine.
/// Server CPU is the user and system time of the backends, which the postmaster collects when they
/// exit; long-lived processes (checkpointer, autovacuum launcher, workers) are not in it, so run the
/// cluster with `autovacuum = off`.
pub fn pgbench_cpu(cluster: &Cluster, script: &str, clients: u32, transactions: u32) -> Result<(f64, f64)> {
    let postmaster = cluster.postmaster_pid().context("the cluster is not running")?;
    let before = children_cpu_seconds(postmaster)?;
    let report = run_pgbench(cluster, script, clients, &["-t".into(), transactions.to_string()])?;
    let tps = parse_tps(&report).with_context(|| format!("no tps line in pgbench output:\n{report}"))?;
    // The backends exit just after pgbench disconnects; wait until the postmaster has collected them.
    let mut spent = 0.0;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let now = children_cpu_seconds(postmaster)? - before;
        if now > 0.0 && now == spent {
            break;
        }
        spent = now;
    }
    Ok((tps, f64::from(clients * transactions) / spent))
}

/// User + system seconds of the exited (and reaped) children of `pid`, from /proc/PID/stat.
fn children_cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = children_cpu_ticks(&stat).context("malformed /proc stat")?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / per_second)
}

/// cutime + cstime (fields 16 and 17 of proc(5)); the command name before them may hold spaces, so
/// fields are counted after its closing parenthesis, from the state (field 3).
fn children_cpu_ticks(stat: &str) -> Option<u64> {
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(13)?.parse::<u64>().ok()? + fields.get(14)?.parse::<u64>().ok()?)
}

fn run_pgbench(cluster: &Cluster, script: &str, clients: u32, limit: &[String]) -> Result<String> {
    let mut file = tempfile::Builder::new().prefix("tenant_scale-bench-").suffix(".sql").tempfile()?;
    file.write_all(script.as_bytes())?;
    let output = Command::new(pg_bindir()?.join("pgbench"))
        // No -d: for pgbench that is --debug (a line per protocol message), not the database.
        .args(["-n", "-M", "prepared", "-h", "127.0.0.1", "-U", "postgres"])
        .arg("-p")
        .arg(cluster.port().to_string())
        .arg("-c")
        .arg(clients.to_string())
        .arg("-j")
        .arg(clients.to_string())
        .args(limit)
        .arg("-f")
        .arg(file.path())
        .arg("postgres")
        .output()
        .context("running pgbench")?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!("pgbench failed:\n{stdout}{}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(stdout)
}

/// The `tps = N (without initial connection time)` figure of a pgbench report.
fn parse_tps(report: &str) -> Option<f64> {
    report
        .lines()
        .find(|line| line.starts_with("tps = ") && line.contains("without initial connection time"))?
        .strip_prefix("tps = ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Measurements of several variants of one workload over interleaved rounds. The first variant is
/// the baseline the others are compared with, round by round.
pub struct Comparison {
    workload: String,
    variants: Vec<(String, Vec<f64>)>,
    unit: &'static str,
}

impl Comparison {
    /// `unit` names what the figures are ("tps", "ms").
    pub fn new(workload: &str, variants: &[&str], unit: &'static str) -> Self {
        Comparison {
            workload: workload.to_string(),
            variants: variants.iter().map(|name| (name.to_string(), Vec::new())).collect(),
            unit,
        }
    }

    /// Runs `rounds` rounds; in each, `measure(variant_index)` is called once for every variant, in
    /// the round's order (see the module documentation).
    pub fn run(&mut self, rounds: usize, mut measure: impl FnMut(usize) -> Result<f64>) -> Result<()> {
        for round in 0..rounds {
            for index in round_order(round, self.variants.len()) {
                let figure = measure(index)?;
                self.variants[index].1.push(figure);
            }
        }
        Ok(())
    }

    /// Records a round measured all at once by a runner that alternates the variants itself (finer
    /// than one run per variant): one figure per variant, in variant order.
    pub fn record_round(&mut self, figures: &[f64]) {
        assert_eq!(figures.len(), self.variants.len(), "one figure per variant");
        for ((_, recorded), figure) in self.variants.iter_mut().zip(figures) {
            recorded.push(*figure);
        }
    }

    /// Median over rounds of `variant / baseline`, for the variant at `index`.
    pub fn median_ratio(&self, index: usize) -> f64 {
        self.median_ratio_to(index, 0)
    }

    /// Median over rounds of `variant / other`, for two variants measured in the same rounds.
    pub fn median_ratio_to(&self, index: usize, other: usize) -> f64 {
        let base = &self.variants[other].1;
        let ratios: Vec<f64> =
            self.variants[index].1.iter().zip(base).map(|(figure, base)| figure / base).collect();
        median(&ratios)
    }

    /// One line per variant: every round's figure, the median, and the median ratio to the baseline.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for (index, (name, figures)) in self.variants.iter().enumerate() {
            let runs: Vec<String> = figures.iter().map(|figure| format!("{figure:.1}")).collect();
            out.push_str(&format!(
                "{}: {name}: {} [{}] median {:.1}; median ratio to {} {:.3}x\n",
                self.workload,
                self.unit,
                runs.join(", "),
                median(figures),
                self.variants[0].0,
                self.median_ratio(index)
            ));
        }
        out
    }
}

/// The variants in the order round `round` measures them: starting one further each round.
fn round_order(round: usize, variants: usize) -> impl Iterator<Item = usize> {
    (0..variants).map(move |step| (round + step) % variants)
}

/// Runs `rounds` interleaved rounds of one workload measured with [`pgbench_cpu`]-style figures:
/// `measure(variant)` returns (rate, rate per second of server CPU), and the two are compared
/// separately, in that order, so that a runner can print both and judge on the second.
pub fn compare_with_cpu(
    workload: &str,
    variants: &[&str],
    unit: &'static str,
    rounds: usize,
    mut measure: impl FnMut(usize) -> Result<(f64, f64)>,
) -> Result<[Comparison; 2]> {
    let mut by_time = Comparison::new(workload, variants, unit);
    let mut by_cpu = Comparison::new(workload, variants, "per server CPU second");
    for round in 0..rounds {
        for index in round_order(round, variants.len()) {
            let (rate, rate_per_cpu) = measure(index)?;
            by_time.variants[index].1.push(rate);
            by_cpu.variants[index].1.push(rate_per_cpu);
        }
    }
    Ok([by_time, by_cpu])
}

/// Connections held open to several clusters (one per variant of a comparison), over which every
/// client sends its transactions to each variant in turn, so that all variants run under the same
/// load of the rest of the machine. On these shared machines the CPU time of a transaction swings by
/// a third from one second to the next, and runs made one after the other (pgbench) cannot tell
/// that from a difference between the variants. Interleaved transaction by transaction, the median
/// ratio of two identical clusters came within 1.5 % of 1 in every run recorded over 40 rounds, and
/// within 1 % over 120. Each variant's cost is read from its backends' own CPU clocks
/// (/proc/PID/schedstat, in ns, user and system) before and after a batch.
///
/// Every transaction of a variant follows transactions of the others on the same core, so it finds
/// the CPU caches as a server with many busy connections leaves them, colder than a pgbench run on
/// one cluster does: code and data an extension adds to each statement weigh accordingly.
pub struct Interleaved {
    /// `clients[client][variant]`
    clients: Vec<Vec<Session>>,
}

/// One connection, its backend's pid and the statements prepared on it, in the order given to
/// [`Interleaved::open`].
pub struct Session {
    pub client: postgres::Client,
    pub statements: Vec<postgres::Statement>,
    backend_pid: u32,
}

impl Interleaved {
    /// `clients` connections to each of `clusters`, each with `statements` prepared.
    pub fn open(clusters: &[&Cluster], clients: usize, statements: &[&str]) -> Result<Self> {
        let open_session = |cluster: &Cluster| -> Result<Session> {
            let mut client = cluster.connect()?;
            let backend_pid: i32 = client.query_one("SELECT pg_backend_pid()", &[])?.get(0);
            let statements =
                statements.iter().map(|sql| client.prepare(sql)).collect::<Result<Vec<_>, _>>()?;
            Ok(Session { client, statements, backend_pid: backend_pid.try_into()? })
        };
        let clients = (0..clients)
            .map(|_| clusters.iter().map(|cluster| open_session(cluster)).collect())
            .collect::<Result<_>>()?;
        Ok(Interleaved { clients })
    }

    /// Runs `sql` on every connection of `variant`, outside any measurement.
    pub fn batch_execute(&mut self, variant: usize, sql: &str) -> Result<()> {
        for sessions in &mut self.clients {
            sessions[variant].client.batch_execute(sql)?;
        }
        Ok(())
    }

    /// Every client, on a thread of its own, runs `transactions` rounds in which each variant runs
    /// one transaction, starting one variant further every round; `transaction(session, client, i)`
    /// runs the client's i-th. Returns, per variant, the server CPU per transaction in ns.
    pub fn cpu_ns_per_transaction(
        &mut self,
        transactions: u32,
        transaction: impl Fn(&mut Session, usize, u32) -> Result<(), postgres::Error> + Sync,
    ) -> Result<Vec<f64>> {
        let before = self.backends_cpu_ns()?;
        std::thread::scope(|scope| {
            let workers: Vec<_> = self
                .clients
                .iter_mut()
                .enumerate()
                .map(|(client, sessions)| {
                    let transaction = &transaction;
                    scope.spawn(move || {
                        let variants = sessions.len();
                        (0..transactions).try_for_each(|i| {
                            round_order(i as usize, variants)
                                .try_for_each(|variant| transaction(&mut sessions[variant], client, i))
                        })
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|worker| worker.join().expect("a bench client panicked"))
        })?;
        let after = self.backends_cpu_ns()?;
        let per_variant = self.clients.len() as f64 * f64::from(transactions);
        Ok(after.iter().zip(before).map(|(after, before)| (after - before) as f64 / per_variant).collect())
    }

    /// Per variant, the CPU time its backends have used so far.
    fn backends_cpu_ns(&self) -> Result<Vec<u64>> {
        let variants = self.clients.first().map_or(0, Vec::len);
        let mut spent = vec![0; variants];
        for sessions in &self.clients {
            for (variant, session) in sessions.iter().enumerate() {
                let path = format!("/proc/{}/schedstat", session.backend_pid);
                let schedstat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
                spent[variant] +=
                    schedstat_cpu_ns(&schedstat).with_context(|| format!("malformed {path}: {schedstat}"))?;
            }
        }
        Ok(spent)
    }
}

/// Time spent on the CPU, in ns: the first field of /proc/PID/schedstat.
fn schedstat_cpu_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

/// SQL expression: the CPU time this backend has used so far, in ns (first field of
/// /proc/self/schedstat). Unlike wall time it leaves out what the machine spent on other processes.
/// Read with pg_read_file, so the session must be a superuser's.
pub const BACKEND_CPU_NS: &str = "split_part(pg_read_file('/proc/self/schedstat'), ' ', 1)::bigint";

/// The first lines of every runner's output, for benches/RESULTS.md: when, on what, against what.
pub fn machine_header() -> Result<String> {
    let shell = |command: &str| -> Result<String> {
        let output = Command::new("sh").arg("-c").arg(command).output()?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    let postgres = Command::new(pg_bindir()?.join("postgres")).arg("--version").output()?;
    Ok(format!(
        "date: {}
machine: {} cores, {}, {} memory
postgres: {}
",
        shell("date -u '+%Y-%m-%d %H:%M UTC'")?,
        shell("nproc")?,
        shell("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2")?,
        shell("free -g | awk '/^Mem:/ {print $2 \" GiB\"}'")?,
        String::from_utf8_lossy(&postgres.stdout).trim()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tps_is_read_from_the_line_without_connection_time() {
        let report = "number of failed transactions: 0 (0.000%)\nlatency average = 1.2 ms\n\
                      initial connection time = 3.1 ms\ntps = 812.5 (without initial connection time)\n";
        assert_eq!(parse_tps(report), Some(812.5));
        assert_eq!(parse_tps("tps = 1 (including connections establishing)\n"), None);
    }

    #[test]
    fn children_cpu_is_read_after_a_command_name_with_spaces() {
        let stat = "4242 (postgres: x (y)) S 1 4242 4242 0 -1 4194560 900 12000 0 3 11 7 250 130 20 0 1 0";
        assert_eq!(children_cpu_ticks(stat), Some(250 + 130));
        assert_eq!(children_cpu_ticks("4242 (short) S 1"), None);
    }

    #[test]
    fn cpu_time_is_the_first_field_of_schedstat() {
        assert_eq!(schedstat_cpu_ns("123456789 4242 17\n"), Some(123_456_789));
        assert_eq!(schedstat_cpu_ns(""), None);
    }

    #[test]
    fn ratios_are_taken_round_by_round_before_the_median() {
        let mut comparison = Comparison::new("w", &["plain", "ext"], "tps");
        let mut figures = [vec![100.0, 50.0, 200.0].into_iter(), vec![95.0, 48.0, 180.0].into_iter()];
        comparison.run(3, |variant| Ok(figures[variant].next().unwrap())).unwrap();
        // Rounds gave ratios 0.95, 0.96, 0.90: the median is 0.95 although the medians of the raw
        // figures (100 and 95) would say the same only by chance.
        assert!((comparison.median_ratio(1) - 0.95).abs() < 1e-9);
        assert!(comparison.report().contains("median ratio to plain 0.950x"));
        assert!((comparison.median_ratio_to(0, 1) - 1.0 / 0.95).abs() < 1e-9);
        assert_eq!(median(&[3.0, 1.0, 2.0, 4.0]), 2.5);
    }

    #[test]
    fn a_round_measured_at_once_is_recorded_in_variant_order() {
        let mut comparison = Comparison::new("w", &["plain", "ext"], "tps");
        comparison.record_round(&[100.0, 90.0]);
        comparison.record_round(&[50.0, 40.0]);
        assert!((comparison.median_ratio(1) - 0.85).abs() < 1e-9);
    }

    #[test]
    fn each_round_starts_one_variant_further() {
        let mut order = Vec::new();
        Comparison::new("w", &["a", "b", "c"], "tps")
            .run(4, |variant| {
                order.push(variant);
                Ok(1.0)
            })
            .unwrap();
        assert_eq!(order, [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]);
    }

    #[test]
    fn both_figures_of_a_run_are_compared_separately() {
        let mut runs =
            [vec![(100.0, 10.0), (60.0, 10.0)].into_iter(), vec![(90.0, 9.5), (30.0, 9.0)].into_iter()];
        let [by_time, by_cpu] =
            compare_with_cpu("w", &["plain", "ext"], "tps", 2, |variant| Ok(runs[variant].next().unwrap()))
                .unwrap();
        assert!((by_time.median_ratio(1) - (0.9 + 0.5) / 2.0).abs() < 1e-9);
        assert!((by_cpu.median_ratio(1) - (0.95 + 0.9) / 2.0).abs() < 1e-9);
        assert!(by_cpu.report().contains("w: ext: per server CPU second [9.5, 9.0]"));
    }
}
