//! Per-op wall-time profile of the CPU backend: where a forward or a training
//! step spends its time, by backend op (see `CpuBackend::set_op_profiling`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Total wall time and call count of one op.
#[derive(Clone, Debug, PartialEq)]
pub struct OpTime {
    /// Backend op name (`linear`, `attention_backward`, ...).
    pub name: &'static str,
    /// Calls recorded.
    pub calls: u64,
    /// Summed wall time.
    pub total: Duration,
}

/// The shared table behind a backend and its clones.
#[derive(Default)]
pub(crate) struct OpProfile {
    on: AtomicBool,
    table: Mutex<Vec<OpTime>>,
}

impl OpProfile {
    #[inline]
    pub(crate) fn enabled(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    pub(crate) fn set_enabled(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    pub(crate) fn record(&self, name: &'static str, dt: Duration) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match t.iter_mut().find(|o| o.name == name) {
            Some(o) => {
                o.calls += 1;
                o.total += dt;
            }
            None => t.push(OpTime {
                name,
                calls: 1,
                total: dt,
            }),
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<OpTime> {
        let mut v = self.table.lock().unwrap_or_else(|e| e.into_inner()).clone();
        v.sort_by_key(|o| std::cmp::Reverse(o.total));
        v
    }

    pub(crate) fn reset(&self) {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// Formats a profile as an aligned text table with each op's share.
pub fn format_table(ops: &[OpTime]) -> String {
    let total: f64 = ops.iter().map(|o| o.total.as_secs_f64()).sum();
    let mut s = format!(
        "{:<28} {:>8} {:>11} {:>7}\n",
        "op", "calls", "total ms", "share"
    );
    for o in ops {
        let t = o.total.as_secs_f64();
        s += &format!(
            "{:<28} {:>8} {:>11.1} {:>6.1}%\n",
            o.name,
            o.calls,
            t * 1e3,
            100.0 * t / total.max(1e-12)
        );
    }
    s += &format!("{:<28} {:>8} {:>11.1}\n", "total", "", total * 1e3);
    s
}
