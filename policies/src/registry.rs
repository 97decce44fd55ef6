//! The policy registry: names to constructors, defaults, and assignments.
//!
//! A *spec* names a policy and, for parameterised ones, its parameter after a colon:
//! `first-fit`, `fhp:64K`, `quota:4096`, `evict-harder:128`. Names (and aliases, such as
//! the tutorial's `policyOne` for `first-fit`) are unique across the three kinds, so a
//! config line `process redis fhp:64K` and a line `process redis hints` can both be read
//! as "assign this spec to redis" and land on the right kind.
//!
//! Every assignment and default is *built once* when it is set, so a bad parameter is
//! reported against the config line that named it, not at the first fault. Policies are
//! then built per process (daemon: on `NewProcess`) or per region (embedded), each
//! instance owned by the runtime.
//!
//! ```
//! use usm_policies::{PolicyKind, Registry};
//!
//! let mut reg = Registry::with_builtins();
//! assert_eq!(reg.assign_process("redis-server", "fhp:64K")?, PolicyKind::Alloc);
//! reg.assign_process("redis-server", "hints")?;
//! let set = reg.for_process("redis-server")?.expect("assigned");
//! assert_eq!((set.alloc.name(), set.evict.name(), set.oom.name()), ("fhp:64K", "hints", "fail"));
//! assert!(reg.for_process("bash")?.is_none()); // unmatched processes run untouched
//!
//! let err = reg.assign_process("redis-server", "fhp:48K").unwrap_err();
//! assert_eq!(err.token(), Some("48K"));
//! let err = reg.assign_process("x", "lru").unwrap_err();
//! assert!(err.to_string().contains("first-fit"), "{err}"); // lists the known names
//! # Ok::<(), usm_policies::PolicyError>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::alloc::AllocPolicy;
use crate::error::PolicyError;
use crate::evict::EvictPolicy;
use crate::oom::OomPolicy;

/// The three kinds of policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    /// [`AllocPolicy`].
    Alloc,
    /// [`EvictPolicy`].
    Evict,
    /// [`OomPolicy`].
    Oom,
}

impl PolicyKind {
    fn index(self) -> usize {
        match self {
            PolicyKind::Alloc => 0,
            PolicyKind::Evict => 1,
            PolicyKind::Oom => 2,
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyKind::Alloc => "allocation",
            PolicyKind::Evict => "eviction",
            PolicyKind::Oom => "OOM",
        })
    }
}

/// Whether a policy takes a parameter (`name:PARAM`); the string is an example shown in
/// errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// `name` only.
    None,
    /// `name:PARAM` only.
    Required(&'static str),
    /// `name` or `name:PARAM`.
    Optional(&'static str),
}

type Ctor<T> = Box<dyn Fn(Option<&str>) -> Result<Box<T>, PolicyError> + Send + Sync>;

enum Constructor {
    Alloc(Ctor<dyn AllocPolicy>),
    Evict(Ctor<dyn EvictPolicy>),
    Oom(Ctor<dyn OomPolicy>),
}

impl Constructor {
    fn kind(&self) -> PolicyKind {
        match self {
            Constructor::Alloc(_) => PolicyKind::Alloc,
            Constructor::Evict(_) => PolicyKind::Evict,
            Constructor::Oom(_) => PolicyKind::Oom,
        }
    }
}

struct Entry {
    param: Param,
    ctor: Constructor,
}

/// The specs assigned to one process name or region; `None` falls back to the default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    /// Allocation policy spec.
    pub alloc: Option<String>,
    /// Eviction policy spec.
    pub evict: Option<String>,
    /// OOM policy spec.
    pub oom: Option<String>,
}

impl Assignment {
    fn slot(&mut self, kind: PolicyKind) -> &mut Option<String> {
        match kind {
            PolicyKind::Alloc => &mut self.alloc,
            PolicyKind::Evict => &mut self.evict,
            PolicyKind::Oom => &mut self.oom,
        }
    }
}

/// One freshly built policy of each kind, for one process or region.
pub struct PolicySet {
    /// Serves faults.
    pub alloc: Box<dyn AllocPolicy>,
    /// Chooses victims.
    pub evict: Box<dyn EvictPolicy>,
    /// Decides on out-of-memory.
    pub oom: Box<dyn OomPolicy>,
}

impl fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicySet")
            .field("alloc", &self.alloc.name())
            .field("evict", &self.evict.name())
            .field("oom", &self.oom.name())
            .finish()
    }
}

/// Policies by name, defaults, and per-process / per-region assignments. `Send + Sync`:
/// build it from the config once and share it.
#[derive(Default)]
pub struct Registry {
    entries: BTreeMap<String, Entry>,
    aliases: BTreeMap<String, String>,
    defaults: [Option<String>; 3],
    processes: HashMap<String, Assignment>,
    regions: HashMap<String, Assignment>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("names", &self.known_names())
            .field("defaults", &self.defaults)
            .field("processes", &self.processes)
            .field("regions", &self.regions)
            .finish()
    }
}

/// Splits a spec at its first `:` into name and parameter.
pub fn split_spec(spec: &str) -> (&str, Option<&str>) {
    match spec.trim().split_once(':') {
        Some((name, param)) => (name, Some(param)),
        None => (spec.trim(), None),
    }
}

impl Registry {
    /// An empty registry (no policies, no defaults).
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry holding every built-in policy, with `first-fit`, `two-list` and `fail` as
    /// defaults (see [`builtin`](crate::builtin)).
    pub fn with_builtins() -> Self {
        let mut r = Self::new();
        let registered = crate::builtin::register_builtins(&mut r);
        debug_assert!(registered.is_ok(), "built-ins conflict: {registered:?}");
        r
    }

    fn insert(&mut self, name: &str, param: Param, ctor: Constructor) -> Result<(), PolicyError> {
        if name.is_empty() || name.contains(':') || name.contains(char::is_whitespace) {
            return Err(PolicyError::BadParameter {
                policy: name.into(),
                token: name.into(),
                reason: "a policy name must be non-empty, without `:` or spaces".into(),
            });
        }
        if self.entries.contains_key(name) || self.aliases.contains_key(name) {
            return Err(PolicyError::DuplicateName { name: name.into() });
        }
        self.entries.insert(name.into(), Entry { param, ctor });
        Ok(())
    }

    /// Registers an allocation policy. `ctor` gets the parameter text (after the `:`), if
    /// any, and reports a bad one with [`PolicyError::BadParameter`] naming the token.
    pub fn register_alloc(
        &mut self,
        name: &str,
        param: Param,
        ctor: impl Fn(Option<&str>) -> Result<Box<dyn AllocPolicy>, PolicyError> + Send + Sync + 'static,
    ) -> Result<(), PolicyError> {
        self.insert(name, param, Constructor::Alloc(Box::new(ctor)))
    }

    /// Registers an eviction policy (see [`register_alloc`](Self::register_alloc)).
    pub fn register_evict(
        &mut self,
        name: &str,
        param: Param,
        ctor: impl Fn(Option<&str>) -> Result<Box<dyn EvictPolicy>, PolicyError> + Send + Sync + 'static,
    ) -> Result<(), PolicyError> {
        self.insert(name, param, Constructor::Evict(Box::new(ctor)))
    }

    /// Registers an OOM policy (see [`register_alloc`](Self::register_alloc)).
    pub fn register_oom(
        &mut self,
        name: &str,
        param: Param,
        ctor: impl Fn(Option<&str>) -> Result<Box<dyn OomPolicy>, PolicyError> + Send + Sync + 'static,
    ) -> Result<(), PolicyError> {
        self.insert(name, param, Constructor::Oom(Box::new(ctor)))
    }

    /// Makes `alias` another name for the registered `target`.
    pub fn register_alias(&mut self, alias: &str, target: &str) -> Result<(), PolicyError> {
        if self.entries.contains_key(alias) || self.aliases.contains_key(alias) {
            return Err(PolicyError::DuplicateName { name: alias.into() });
        }
        self.lookup(target)?;
        self.aliases.insert(alias.into(), target.into());
        Ok(())
    }

    /// Every registered name and alias, sorted.
    pub fn known_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .entries
            .keys()
            .chain(self.aliases.keys())
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// The names of one kind with their parameter shape (aliases not included).
    pub fn names_of(&self, kind: PolicyKind) -> Vec<(String, Param)> {
        self.entries
            .iter()
            .filter(|(_, e)| e.ctor.kind() == kind)
            .map(|(n, e)| (n.clone(), e.param))
            .collect()
    }

    fn lookup(&self, name: &str) -> Result<(&str, &Entry), PolicyError> {
        let canonical = self.aliases.get(name).map_or(name, String::as_str);
        match self.entries.get_key_value(canonical) {
            Some((n, e)) => Ok((n.as_str(), e)),
            None => Err(PolicyError::UnknownPolicy {
                name: name.into(),
                known: self.known_names(),
            }),
        }
    }

    /// The kind of the policy a spec names.
    pub fn kind_of(&self, spec: &str) -> Result<PolicyKind, PolicyError> {
        let (name, _) = split_spec(spec);
        Ok(self.lookup(name)?.1.ctor.kind())
    }

    fn param_checked<'a>(
        &self,
        name: &str,
        entry: &Entry,
        param: Option<&'a str>,
    ) -> Result<Option<&'a str>, PolicyError> {
        match (entry.param, param) {
            (Param::None, Some(p)) => Err(PolicyError::UnexpectedParameter {
                policy: name.into(),
                token: p.into(),
            }),
            (Param::Required(example), None) => Err(PolicyError::MissingParameter {
                policy: name.into(),
                example: example.into(),
            }),
            _ => Ok(param),
        }
    }

    fn wrong_kind(spec: &str, found: PolicyKind, expected: PolicyKind) -> PolicyError {
        PolicyError::WrongKind {
            name: split_spec(spec).0.into(),
            found,
            expected,
        }
    }

    /// Builds an allocation policy from a spec.
    pub fn build_alloc(&self, spec: &str) -> Result<Box<dyn AllocPolicy>, PolicyError> {
        let (name, param) = split_spec(spec);
        let (canonical, entry) = self.lookup(name)?;
        let param = self.param_checked(canonical, entry, param)?;
        match &entry.ctor {
            Constructor::Alloc(c) => c(param),
            other => Err(Self::wrong_kind(spec, other.kind(), PolicyKind::Alloc)),
        }
    }

    /// Builds an eviction policy from a spec.
    pub fn build_evict(&self, spec: &str) -> Result<Box<dyn EvictPolicy>, PolicyError> {
        let (name, param) = split_spec(spec);
        let (canonical, entry) = self.lookup(name)?;
        let param = self.param_checked(canonical, entry, param)?;
        match &entry.ctor {
            Constructor::Evict(c) => c(param),
            other => Err(Self::wrong_kind(spec, other.kind(), PolicyKind::Evict)),
        }
    }

    /// Builds an OOM policy from a spec.
    pub fn build_oom(&self, spec: &str) -> Result<Box<dyn OomPolicy>, PolicyError> {
        let (name, param) = split_spec(spec);
        let (canonical, entry) = self.lookup(name)?;
        let param = self.param_checked(canonical, entry, param)?;
        match &entry.ctor {
            Constructor::Oom(c) => c(param),
            other => Err(Self::wrong_kind(spec, other.kind(), PolicyKind::Oom)),
        }
    }

    /// Builds the spec once to validate it; returns its kind.
    pub fn validate(&self, spec: &str) -> Result<PolicyKind, PolicyError> {
        let kind = self.kind_of(spec)?;
        match kind {
            PolicyKind::Alloc => self.build_alloc(spec).map(drop),
            PolicyKind::Evict => self.build_evict(spec).map(drop),
            PolicyKind::Oom => self.build_oom(spec).map(drop),
        }?;
        Ok(kind)
    }

    /// Makes `spec` the default of its kind (the config's `policy NAME` line).
    pub fn set_default(&mut self, spec: &str) -> Result<PolicyKind, PolicyError> {
        let kind = self.validate(spec)?;
        self.defaults[kind.index()] = Some(spec.trim().to_owned());
        Ok(kind)
    }

    /// The default spec of a kind.
    pub fn default_spec(&self, kind: PolicyKind) -> Option<&str> {
        self.defaults[kind.index()].as_deref()
    }

    /// Assigns `spec` to processes named `process` (the config's `process NAME POLICY`
    /// line); returns the kind it was assigned as. A later spec of the same kind replaces
    /// the earlier one.
    pub fn assign_process(&mut self, process: &str, spec: &str) -> Result<PolicyKind, PolicyError> {
        let kind = self.validate(spec)?;
        *self
            .processes
            .entry(process.to_owned())
            .or_default()
            .slot(kind) = Some(spec.trim().to_owned());
        Ok(kind)
    }

    /// Assigns `spec` to the embedded region named `region`.
    pub fn assign_region(&mut self, region: &str, spec: &str) -> Result<PolicyKind, PolicyError> {
        let kind = self.validate(spec)?;
        *self
            .regions
            .entry(region.to_owned())
            .or_default()
            .slot(kind) = Some(spec.trim().to_owned());
        Ok(kind)
    }

    /// What was assigned to a process name.
    pub fn process_assignment(&self, process: &str) -> Option<&Assignment> {
        self.processes.get(process)
    }

    fn build_set(&self, a: &Assignment) -> Result<PolicySet, PolicyError> {
        let spec = |own: &Option<String>, kind: PolicyKind| -> Result<String, PolicyError> {
            own.clone()
                .or_else(|| self.defaults[kind.index()].clone())
                .ok_or(PolicyError::NoDefault { kind })
        };
        Ok(PolicySet {
            alloc: self.build_alloc(&spec(&a.alloc, PolicyKind::Alloc)?)?,
            evict: self.build_evict(&spec(&a.evict, PolicyKind::Evict)?)?,
            oom: self.build_oom(&spec(&a.oom, PolicyKind::Oom)?)?,
        })
    }

    /// Fresh policies for a process named `process`, or `None` when nothing was assigned
    /// to that name (daemon mode leaves such processes unmanaged). Kinds not assigned get
    /// the defaults.
    pub fn for_process(&self, process: &str) -> Result<Option<PolicySet>, PolicyError> {
        self.processes
            .get(process)
            .map(|a| self.build_set(a))
            .transpose()
    }

    /// Fresh policies for the embedded region `region`: its assignment, defaults for the
    /// rest (every region is managed).
    pub fn for_region(&self, region: &str) -> Result<PolicySet, PolicyError> {
        match self.regions.get(region) {
            Some(a) => self.build_set(a),
            None => self.defaults(),
        }
    }

    /// Fresh default policies.
    pub fn defaults(&self) -> Result<PolicySet, PolicyError> {
        self.build_set(&Assignment::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn registry_is_shareable() {
        assert_send_sync::<Registry>();
    }

    #[test]
    fn builtins_and_alias_build() {
        let r = Registry::with_builtins();
        for spec in [
            "first-fit",
            "policyOne",
            "fhp:8K",
            "fhp:2M",
            "quota:1",
            "quota:16M",
        ] {
            assert_eq!(r.validate(spec), Ok(PolicyKind::Alloc), "{spec}");
        }
        for spec in ["fifo", "clock", "hints", "two-list", "two-list:25"] {
            assert_eq!(r.validate(spec), Ok(PolicyKind::Evict), "{spec}");
        }
        for spec in ["fail", "evict-harder", "evict-harder:8", "kill-largest"] {
            assert_eq!(r.validate(spec), Ok(PolicyKind::Oom), "{spec}");
        }
        assert_eq!(r.build_alloc("policyOne").unwrap().name(), "first-fit");
        assert_eq!(r.build_alloc("fhp:64K").unwrap().name(), "fhp:64K");
        assert_eq!(r.build_alloc("fhp:2M").unwrap().name(), "fhp:2048K");
        let d = r.defaults().unwrap();
        assert_eq!(
            (d.alloc.name(), d.evict.name(), d.oom.name()),
            ("first-fit", "two-list", "fail")
        );
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let r = Registry::with_builtins();
        let e = r.validate("lru").unwrap_err();
        let PolicyError::UnknownPolicy { name, known } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(name, "lru");
        for n in [
            "clock",
            "fhp",
            "first-fit",
            "policyOne",
            "quota",
            "kill-largest",
        ] {
            assert!(known.iter().any(|k| k == n), "{n} missing from {known:?}");
        }
        assert!(e.to_string().contains("policyOne"));
    }

    #[test]
    fn bad_parameters_name_the_token() {
        let r = Registry::with_builtins();
        for (spec, token) in [
            ("fhp:48K", "48K"),
            ("fhp:4K", "4K"),
            ("fhp:4M", "4M"),
            ("fhp:sixty", "sixty"),
            ("quota:0", "0"),
            ("quota:12X", "12X"),
            ("quota:6K", "6K"),
            ("evict-harder:zero", "zero"),
            ("clock:3", "3"),
        ] {
            let e = r.validate(spec).unwrap_err();
            assert_eq!(e.token(), Some(token), "{spec}: {e}");
            assert!(e.to_string().contains(token), "{e}");
            assert!(e.is_config_error());
        }
        let e = r.validate("fhp").unwrap_err();
        assert!(matches!(e, PolicyError::MissingParameter { .. }), "{e}");
        assert!(e.to_string().contains("fhp:64K"));
    }

    #[test]
    fn assignments_by_kind_with_defaults_and_wrong_kind() {
        let mut r = Registry::with_builtins();
        assert_eq!(
            r.assign_process("stressapptest", "policyOne"),
            Ok(PolicyKind::Alloc)
        );
        assert_eq!(
            r.assign_process("stressapptest", "evict-harder:16"),
            Ok(PolicyKind::Oom)
        );
        let s = r.for_process("stressapptest").unwrap().unwrap();
        assert_eq!(
            (s.alloc.name(), s.evict.name(), s.oom.name()),
            ("first-fit", "two-list", "evict-harder:16")
        );
        assert!(r.for_process("other").unwrap().is_none());
        assert!(r.assign_process("x", "fhp:3K").is_err());
        assert!(
            r.process_assignment("x").is_none(),
            "a failed assignment leaves nothing"
        );

        r.assign_region("heap", "fhp:2M").unwrap();
        assert_eq!(r.for_region("heap").unwrap().alloc.name(), "fhp:2048K");
        assert_eq!(r.for_region("other").unwrap().alloc.name(), "first-fit");

        assert_eq!(r.set_default("fifo"), Ok(PolicyKind::Evict));
        assert_eq!(r.defaults().unwrap().evict.name(), "fifo");
        let e = r.build_alloc("fifo").unwrap_err();
        assert!(
            matches!(
                e,
                PolicyError::WrongKind {
                    found: PolicyKind::Evict,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn duplicates_and_missing_defaults() {
        let mut r = Registry::with_builtins();
        let e = r.register_alias("first-fit", "clock").unwrap_err();
        assert_eq!(
            e,
            PolicyError::DuplicateName {
                name: "first-fit".into()
            }
        );
        assert!(r.register_alias("p2", "nope").is_err());
        let e = r
            .register_evict("policyOne", Param::None, |_| {
                Ok(Box::new(crate::builtin::Fifo::new()))
            })
            .unwrap_err();
        assert!(matches!(e, PolicyError::DuplicateName { .. }));

        let mut empty = Registry::new();
        empty
            .register_alloc("mine", Param::None, |_| {
                Ok(Box::new(crate::builtin::FirstFit))
            })
            .unwrap();
        empty.set_default("mine").unwrap();
        let e = empty.defaults().unwrap_err();
        assert_eq!(
            e,
            PolicyError::NoDefault {
                kind: PolicyKind::Evict
            }
        );
    }
}
