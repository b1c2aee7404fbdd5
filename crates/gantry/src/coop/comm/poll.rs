//! The pure parts of the communicator's waits: a bounded poll loop over any source of
//! "done, pending or failed" and any clock (a fake one in tests, so that timeouts are tested
//! without waiting), the decoding of `ncclCommGetAsyncError`, and the status slots the ranks
//! sum to tell each other of their failures.

use std::time::{Duration, Instant};

use nccl_sys::{ncclResult_t, NcclCode};

use super::STATUS_BYTES;
use crate::error::Error;

/// The first and the longest pause between two looks at an operation in flight: short at
/// first (a collective on NVLink takes microseconds), then no busier than 4,000 looks a second.
/// A round's status exchange waits for the slowest rank's piece, a few milliseconds warm: a
/// longer pause would add itself to every round (only the exchange thread waits here).
const FIRST_PAUSE: Duration = Duration::from_micros(20);
const LAST_PAUSE: Duration = Duration::from_micros(250);

/// The time of one bounded wait: real, or advanced by hand in tests.
pub(super) trait Clock {
    /// Time since the wait began.
    fn elapsed(&self) -> Duration;
    /// Lets `pause` pass.
    fn sleep(&mut self, pause: Duration);
}

pub(super) struct RealClock(pub(super) Instant);

impl Clock for RealClock {
    fn elapsed(&self) -> Duration {
        self.0.elapsed()
    }
    fn sleep(&mut self, pause: Duration) {
        std::thread::sleep(pause);
    }
}

/// What one look at an operation in flight found.
#[derive(Debug)]
pub(super) enum Look {
    Done,
    Pending,
    Failed(Error),
}

/// Why a bounded wait ended before the operation was done.
#[derive(Debug)]
pub(super) enum Stop {
    Failed(Error),
    TimedOut,
}

/// Looks at an operation until it is done or failed, pausing between looks, and gives up once
/// `timeout` has passed. It always looks at least once, and once more after the last pause.
pub(super) fn poll_bounded(
    timeout: Duration,
    clock: &mut impl Clock,
    mut look: impl FnMut() -> Look,
) -> std::result::Result<(), Stop> {
    let mut pause = FIRST_PAUSE;
    loop {
        match look() {
            Look::Done => return Ok(()),
            Look::Failed(e) => return Err(Stop::Failed(e)),
            Look::Pending => {}
        }
        if clock.elapsed() >= timeout {
            return Err(Stop::TimedOut);
        }
        clock.sleep(pause);
        pause = (pause * 2).min(LAST_PAUSE);
    }
}

/// What one look at `ncclCommGetAsyncError` means: `rc` is its own result, `state` the
/// communicator's.
pub(super) fn async_state(
    rc: ncclResult_t,
    state: ncclResult_t,
) -> std::result::Result<Look, NcclCode> {
    nccl_sys::check(rc)?;
    match state {
        nccl_sys::NCCL_SUCCESS => Ok(Look::Done),
        nccl_sys::NCCL_IN_PROGRESS => Ok(Look::Pending),
        code => Err(NcclCode(code)),
    }
}

/// The status slots of `world` ranks with this rank's `failure` (truncated to fit) in its own.
pub(super) fn status_slots(world: usize, rank: usize, failure: Option<&str>) -> Vec<u8> {
    let mut slots = vec![0u8; STATUS_BYTES * world];
    if let Some(message) = failure {
        let slot = &mut slots[rank * STATUS_BYTES..][..STATUS_BYTES];
        slot[0] = 1;
        let mut end = message.len().min(STATUS_BYTES - 1);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        slot[1..1 + end].copy_from_slice(&message.as_bytes()[..end]);
    }
    slots
}

/// Per rank, its failure message, from the summed slots.
pub(super) fn read_status(slots: &[u8]) -> Vec<Option<String>> {
    slots
        .chunks(STATUS_BYTES)
        .map(|slot| {
            (slot[0] != 0).then(|| {
                let text = &slot[1..];
                let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
                String::from_utf8_lossy(&text[..end]).into_owned()
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock that moves only when slept on, so timeouts are tested without waiting.
    #[derive(Default)]
    struct FakeClock {
        now: Duration,
        pauses: Vec<Duration>,
    }

    impl Clock for FakeClock {
        fn elapsed(&self) -> Duration {
            self.now
        }
        fn sleep(&mut self, pause: Duration) {
            self.now += pause;
            self.pauses.push(pause);
        }
    }

    #[test]
    fn a_wait_that_never_ends_gives_up_after_its_timeout() {
        let timeout = Duration::from_secs(10);
        let mut clock = FakeClock::default();
        let mut looks = 0;
        let polled = poll_bounded(timeout, &mut clock, || {
            looks += 1;
            Look::Pending
        });
        assert!(matches!(polled, Err(Stop::TimedOut)), "{polled:?}");
        assert!(clock.now >= timeout, "gave up early, at {:?}", clock.now);
        assert!(clock.now < timeout + LAST_PAUSE, "gave up late, at {:?}", clock.now);
        assert_eq!(looks, clock.pauses.len() + 1, "one look before each pause and after the last");
        assert_eq!(clock.pauses[0], FIRST_PAUSE);
        assert!(clock.pauses.iter().all(|&p| p <= LAST_PAUSE));
        assert!(clock.pauses.windows(2).all(|w| w[0] <= w[1]), "pauses never shrink");
        // At most 4,000 looks a second once the pauses are long.
        assert!(looks <= 10 * 4000 + 20, "{looks} looks in 10 s");
    }

    #[test]
    fn a_wait_ends_as_soon_as_the_operation_is_done_or_failed() {
        let mut clock = FakeClock::default();
        let mut left = 3;
        let polled = poll_bounded(Duration::from_secs(1), &mut clock, || {
            left -= 1;
            if left == 0 {
                Look::Done
            } else {
                Look::Pending
            }
        });
        assert!(polled.is_ok());
        assert_eq!(clock.pauses, [FIRST_PAUSE, FIRST_PAUSE * 2]);

        let mut clock = FakeClock::default();
        let polled = poll_bounded(Duration::from_secs(1), &mut clock, || {
            Look::Failed(Error::Config("the peer went away".into()))
        });
        assert!(matches!(polled, Err(Stop::Failed(Error::Config(m))) if m == "the peer went away"));
        assert!(clock.pauses.is_empty(), "a failure is not waited on");
    }

    #[test]
    fn an_operation_is_looked_at_once_more_after_the_timeout_passed() {
        // The first pause reaches the deadline; the look after it finds the operation done:
        // that is a success, not a timeout.
        let mut clock = FakeClock::default();
        let mut looks = 0;
        let polled = poll_bounded(FIRST_PAUSE, &mut clock, || {
            looks += 1;
            if looks == 2 {
                Look::Done
            } else {
                Look::Pending
            }
        });
        assert!(polled.is_ok(), "{polled:?}");
        assert_eq!(clock.now, FIRST_PAUSE);
        let mut looks = 0;
        let polled = poll_bounded(Duration::ZERO, &mut FakeClock::default(), || {
            looks += 1;
            Look::Pending
        });
        assert!(matches!(polled, Err(Stop::TimedOut)));
        assert_eq!(looks, 1, "a zero timeout still looks once");
    }

    #[test]
    fn async_states_are_decoded() {
        assert!(matches!(async_state(0, 0), Ok(Look::Done)));
        assert!(matches!(async_state(0, 7), Ok(Look::Pending)));
        assert_eq!(async_state(0, 6).unwrap_err(), NcclCode(6), "ncclRemoteError");
        assert_eq!(async_state(4, 0).unwrap_err(), NcclCode(4), "the call itself failed");
        assert_eq!(async_state(0, 99).unwrap_err(), NcclCode(99));
    }

    #[test]
    fn status_slots_carry_each_ranks_failure_through_a_sum() {
        let long = "é".repeat(STATUS_BYTES);
        let ranks = [status_slots(3, 0, None), status_slots(3, 1, Some("EIO")), {
            status_slots(3, 2, Some(&long))
        }];
        // What the all-reduce (a byte-wise sum) makes of them.
        let summed: Vec<u8> = (0..3 * STATUS_BYTES)
            .map(|i| ranks.iter().map(|r| r[i]).fold(0u8, u8::wrapping_add))
            .collect();
        let read = read_status(&summed);
        assert_eq!(read[0], None);
        assert_eq!(read[1].as_deref(), Some("EIO"));
        let cut = read[2].as_deref().unwrap();
        assert!(long.starts_with(cut) && cut.len() >= STATUS_BYTES - 2, "{} bytes", cut.len());
    }
}
