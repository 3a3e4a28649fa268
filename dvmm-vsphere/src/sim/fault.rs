//! Fault injection: rules that make a simulated call fail, slow down or
//! half-succeed, chosen by operation and trigger.

use std::time::Duration;

use dvmm_core::VsphereError;
use rand::RngExt as _;
use rand::rngs::StdRng;

/// The simulated port operations, for fault rules and call counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `VspherePort::create_vm`.
    CreateVm,
    /// `VspherePort::get_vm`.
    GetVm,
    /// `VspherePort::find_vm`.
    FindVm,
    /// `VspherePort::power_off_vm`.
    PowerOffVm,
    /// `VspherePort::destroy_vm`.
    DestroyVm,
    /// The guest customization of a `create_vm` (checked once per call
    /// that waits for it).
    Customize,
}

impl Operation {
    /// Every operation.
    pub const ALL: [Operation; 6] = [
        Operation::CreateVm,
        Operation::GetVm,
        Operation::FindVm,
        Operation::PowerOffVm,
        Operation::DestroyVm,
        Operation::Customize,
    ];

    pub(crate) const fn index(self) -> usize {
        match self {
            Operation::CreateVm => 0,
            Operation::GetVm => 1,
            Operation::FindVm => 2,
            Operation::PowerOffVm => 3,
            Operation::DestroyVm => 4,
            Operation::Customize => 5,
        }
    }

    /// The port method's name (`create_vm`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            Operation::CreateVm => "create_vm",
            Operation::GetVm => "get_vm",
            Operation::FindVm => "find_vm",
            Operation::PowerOffVm => "power_off_vm",
            Operation::DestroyVm => "destroy_vm",
            Operation::Customize => "guest customization",
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which calls of an operation a rule hits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Trigger {
    /// Every call.
    Always,
    /// The next `n` calls that reach this rule; then the rule is spent and
    /// removed.
    Times(u32),
    /// Each call with this probability, drawn from the simulator's RNG seeded
    /// with `SimulatorConfig::seed`, so a run is reproducible. Values at or
    /// below 0 (and NaN) never fire, values at or above 1 always fire.
    Probability(f64),
    /// Only the n-th call of the operation (1-based, counting every call
    /// since the simulator was built, faulted ones included).
    Nth(u32),
}

/// What happens to a call a rule hits.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// The call fails with this error; nothing changes.
    Error(VsphereError),
    /// The call fails with [`VsphereError::Transport`]; nothing changes.
    Transient,
    /// The call fails with [`VsphereError::DuplicateName`] for the spec's
    /// name and folder; nothing is created.
    DuplicateName,
    /// `create_vm`: the VM is created and powered on, then the answer is lost
    /// and the call fails with [`VsphereError::Transport`] (the connection
    /// broke while waiting for the guest's IP). `power_off_vm` and
    /// `destroy_vm`: the VM is powered off or destroyed, then the answer is
    /// lost the same way. On `get_vm` and `find_vm`, which change nothing,
    /// this is the same as [`Fault::Transient`].
    CreatedButCallFailed,
    /// The call waits this long (on tokio time), then proceeds normally.
    Delay(Duration),
    /// `create_vm`: the clone is made (or an existing VM of this request
    /// adopted) and left powered off, then the call fails with this error,
    /// as a clone whose customization failed for good. On the other
    /// operations, the same as [`Fault::Error`].
    ClonedThenFailed(VsphereError),
}

/// One fault-injection rule. Rules are evaluated in the order they were
/// added; the first one whose operation matches and whose trigger fires
/// decides the call's fault.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultRule {
    /// The operation it applies to.
    pub operation: Operation,
    /// Which calls it hits.
    pub trigger: Trigger,
    /// What happens to them.
    pub fault: Fault,
}

impl FaultRule {
    /// A rule.
    pub fn new(operation: Operation, trigger: Trigger, fault: Fault) -> Self {
        Self {
            operation,
            trigger,
            fault,
        }
    }

    /// Every call of `operation` gets `fault`.
    pub fn always(operation: Operation, fault: Fault) -> Self {
        Self::new(operation, Trigger::Always, fault)
    }

    /// The next `n` calls of `operation` get `fault`.
    pub fn times(operation: Operation, n: u32, fault: Fault) -> Self {
        Self::new(operation, Trigger::Times(n), fault)
    }
}

/// The rule list with its mutable counters.
#[derive(Debug, Default)]
pub(crate) struct FaultRules {
    rules: Vec<FaultRule>,
}

impl FaultRules {
    pub(crate) fn push(&mut self, rule: FaultRule) {
        // A rule that can never fire would only slow every call down.
        if matches!(rule.trigger, Trigger::Times(0) | Trigger::Nth(0)) {
            return;
        }
        self.rules.push(rule);
    }

    pub(crate) fn clear(&mut self) {
        self.rules.clear();
    }

    /// The fault for the `call_number`-th call (1-based) of `operation`, if
    /// a rule fires; spends one use of a counted rule.
    pub(crate) fn pick(
        &mut self,
        operation: Operation,
        call_number: u64,
        rng: &mut StdRng,
    ) -> Option<Fault> {
        let mut hit = None;
        for (index, rule) in self.rules.iter_mut().enumerate() {
            if rule.operation != operation {
                continue;
            }
            let fires = match &mut rule.trigger {
                Trigger::Always => true,
                Trigger::Times(left) => {
                    *left = left.saturating_sub(1);
                    true
                }
                Trigger::Probability(p) => {
                    if p.is_nan() || *p <= 0.0 {
                        false
                    } else {
                        *p >= 1.0 || rng.random_bool(*p)
                    }
                }
                Trigger::Nth(n) => u64::from(*n) == call_number,
            };
            if fires {
                hit = Some(index);
                break;
            }
        }
        let index = hit?;
        let spent = matches!(self.rules[index].trigger, Trigger::Times(0))
            || matches!(self.rules[index].trigger, Trigger::Nth(n) if u64::from(n) == call_number);
        if spent {
            Some(self.rules.remove(index).fault)
        } else {
            Some(self.rules[index].fault.clone())
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn fired(rules: &mut FaultRules, op: Operation, calls: u64, rng: &mut StdRng) -> Vec<u64> {
        (1..=calls)
            .filter(|n| rules.pick(op, *n, rng).is_some())
            .collect()
    }

    #[test]
    fn times_fires_n_calls_then_is_removed() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut rules = FaultRules::default();
        rules.push(FaultRule::times(Operation::CreateVm, 2, Fault::Transient));
        assert_eq!(
            fired(&mut rules, Operation::GetVm, 3, &mut rng),
            Vec::<u64>::new()
        );
        assert_eq!(fired(&mut rules, Operation::CreateVm, 5, &mut rng), [1, 2]);
        assert!(rules.is_empty());
    }

    #[test]
    fn nth_fires_once_and_zero_counts_are_dropped() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut rules = FaultRules::default();
        rules.push(FaultRule::new(
            Operation::FindVm,
            Trigger::Nth(0),
            Fault::Transient,
        ));
        rules.push(FaultRule::times(Operation::FindVm, 0, Fault::Transient));
        assert!(rules.is_empty());
        rules.push(FaultRule::new(
            Operation::FindVm,
            Trigger::Nth(3),
            Fault::Transient,
        ));
        assert_eq!(fired(&mut rules, Operation::FindVm, 6, &mut rng), [3]);
        assert!(rules.is_empty());
    }

    #[test]
    fn first_matching_rule_wins_and_always_stays() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut rules = FaultRules::default();
        rules.push(FaultRule::times(Operation::GetVm, 1, Fault::DuplicateName));
        rules.push(FaultRule::always(Operation::GetVm, Fault::Transient));
        assert_eq!(
            rules.pick(Operation::GetVm, 1, &mut rng),
            Some(Fault::DuplicateName)
        );
        for n in 2..10 {
            assert_eq!(
                rules.pick(Operation::GetVm, n, &mut rng),
                Some(Fault::Transient)
            );
        }
        rules.clear();
        assert_eq!(rules.pick(Operation::GetVm, 10, &mut rng), None);
    }

    #[test]
    fn probability_is_seeded_and_clamped() {
        let run = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut rules = FaultRules::default();
            rules.push(FaultRule::new(
                Operation::CreateVm,
                Trigger::Probability(0.3),
                Fault::Transient,
            ));
            fired(&mut rules, Operation::CreateVm, 1000, &mut rng)
        };
        let a = run(7);
        assert_eq!(a, run(7), "same seed, same faults");
        assert_ne!(a, run(8), "another seed, other faults");
        assert!((200..400).contains(&a.len()), "about 30%: {}", a.len());

        let mut rng = StdRng::seed_from_u64(7);
        for (p, expected) in [(0.0, 0), (-1.0, 0), (f64::NAN, 0), (1.0, 50), (2.0, 50)] {
            let mut rules = FaultRules::default();
            rules.push(FaultRule::new(
                Operation::CreateVm,
                Trigger::Probability(p),
                Fault::Transient,
            ));
            assert_eq!(
                fired(&mut rules, Operation::CreateVm, 50, &mut rng).len(),
                expected,
                "p = {p}"
            );
        }
    }
}
