//! A complete `usm` with an eviction policy of its own: `random`, random replacement, a
//! classic baseline of eviction studies. The policy needs `usm-policies` alone; the
//! binary is `main` at the bottom — `usm_runtime::cli::main_with` and the registration.
//! (The allocation-policy example, `pairs`, is in `usm-policies`' crate docs.)
//!
//! # Run it
//!
//! Build it (a `usm` with every subcommand, plus the policy `random`) and the tagger:
//!
//! ```text
//! cargo build --release -p usm-runtime --example evict_policy -p usm-tagger
//! cp target/release/libusm_tagger.so target/release/examples/   # found next to the binary
//! ```
//!
//! **One program, a private daemon** (`usm exec`): name the policy in a config file.
//!
//! ```text
//! printf 'evict random\n' > random.cfg
//! sudo target/release/examples/evict_policy exec --config random.cfg --pool 16M -- \
//!     python3 -c 'b = bytearray(64 << 20); b[::4096] = b"x" * 16384; print(b.count(b"x"))'
//! ```
//!
//! **The daemon** (`usm run`), serving every program that names its socket:
//!
//! ```text
//! printf 'memory 16M\nevict random\nprocess python3 first-fit\n' > daemon.cfg
//! sudo target/release/examples/evict_policy run daemon.cfg
//! ```
//!
//! `check-config`, `stat` and the rest behave as in `usm`; `check-config daemon.cfg` knows
//! the name `random`. `USM_LOG=evict_policy=info` shows the policy's own log line.
//!
//! **Embedded** (your program is the runtime, no daemon): register the policy in the
//! registry the builder takes, and name it.
//!
//! ```text
//! let mut reg = usm_policies::Registry::with_builtins();
//! reg.register_evict("random", Param::None, |_| Ok(Box::new(RandomEvict::new())))?;
//! let rt = usm_runtime::embedded::Runtime::builder()
//!     .pool_frames(4096)
//!     .evict_policy("random")
//!     .create_swap_file("/var/tmp/app.swap", 64 << 20)
//!     .build_with_registry(reg)?;
//! ```

use std::collections::HashMap;
use std::process::ExitCode;

use usm_policies::{
    EvictCx, EvictPolicy, Eviction, FrameNo, MappedPage, Param, PolicyError, Registry, Urgency,
    VictimRequest, VictimScan,
};

/// Random replacement: every tracked page is equally likely to leave. Pinned pages are
/// never chosen; `EVICTION=DENY` pages only when the request is hard and nothing else is
/// left (the contract of [`EvictPolicy`]).
struct RandomEvict {
    /// Tracked pages, in no order; `index` finds a frame's place for O(1) removal.
    pages: Vec<MappedPage>,
    index: HashMap<FrameNo, usize>,
    /// xorshift64 state.
    rng: u64,
    /// Victims chosen so far (logged once, at the first).
    chosen: u64,
}

impl RandomEvict {
    const NAME: &'static str = "random";

    fn new() -> Self {
        RandomEvict {
            pages: Vec::new(),
            index: HashMap::new(),
            rng: 0x9E37_79B9_7F4A_7C15,
            chosen: 0,
        }
    }

    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn remove_at(&mut self, i: usize) -> MappedPage {
        let page = self.pages.swap_remove(i);
        self.index.remove(&page.frame);
        if let Some(moved) = self.pages.get(i) {
            self.index.insert(moved.frame, i);
        }
        page
    }
}

impl EvictPolicy for RandomEvict {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn on_map(&mut self, page: MappedPage, _cx: &mut dyn EvictCx) {
        if !self.index.contains_key(&page.frame) {
            self.index.insert(page.frame, self.pages.len());
            self.pages.push(page);
        }
    }

    fn on_free(&mut self, frame: FrameNo) {
        if let Some(&i) = self.index.get(&frame) {
            self.remove_at(i);
        }
    }

    fn victims(
        &mut self,
        req: VictimRequest,
        cx: &mut dyn EvictCx,
        out: &mut Vec<MappedPage>,
    ) -> VictimScan {
        let mut scan = VictimScan::default();
        // A bounded number of draws: a scope of one process, or many pinned pages, must
        // not make the search endless; what it misses, the next request may find.
        let mut draws = 4 * req.want + 64;
        while scan.chosen < req.want && draws > 0 && !self.pages.is_empty() {
            draws -= 1;
            let i = (self.next() % self.pages.len() as u64) as usize;
            let page = self.pages[i];
            if !req.scope.admits(page.pid) {
                continue;
            }
            if cx.is_pinned(page.frame) {
                scan.pinned += 1;
            } else if cx.hint(page.pid, page.addr).eviction == Some(Eviction::Deny) {
                scan.denied += 1;
            } else {
                out.push(self.remove_at(i));
                scan.chosen += 1;
            }
        }
        // Still short (a narrow scope, many pinned pages): a pass in order, then — hard
        // requests only — `DENY` pages as the last resort. Downwards, so the page that
        // `remove_at` moves into slot `i` (the last one) was already looked at.
        let passes: &[bool] = match req.urgency {
            Urgency::Normal => &[false],
            Urgency::Hard => &[false, true],
        };
        for &take_denied in passes {
            for i in (0..self.pages.len()).rev() {
                if scan.chosen == req.want {
                    break;
                }
                let page = self.pages[i];
                if !req.scope.admits(page.pid) || cx.is_pinned(page.frame) {
                    continue;
                }
                let denied = cx.hint(page.pid, page.addr).eviction == Some(Eviction::Deny);
                if denied == take_denied {
                    out.push(self.remove_at(i));
                    scan.chosen += 1;
                }
            }
        }
        if self.chosen == 0 && scan.chosen > 0 {
            tracing::info!(
                "random: first victims chosen ({} of {} tracked pages)",
                scan.chosen,
                self.pages.len() + scan.chosen
            );
        }
        self.chosen += scan.chosen as u64;
        scan
    }

    fn tracked(&self) -> usize {
        self.pages.len()
    }
}

/// Adds `random` to the registry of every daemon this `usm` starts.
fn register(reg: &mut Registry) -> Result<(), PolicyError> {
    reg.register_evict(RandomEvict::NAME, Param::None, |_| {
        Ok(Box::new(RandomEvict::new()))
    })
}

fn main() -> ExitCode {
    usm_runtime::cli::main_with(register)
}
