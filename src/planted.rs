//! Defects the simulator (`crate::sim`) can plant in the broker, to measure how many seeds it
//! needs to catch each. Only test builds can plant one: elsewhere [`planted`] is a constant
//! `false` that the compiler folds away. A leaf module, so the broker's modules can ask
//! without depending on the simulator.

/// A defect the simulator can plant in the broker, to measure how fast it is caught.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// A resume resends every unacknowledged delivery, also those at or below the client's
    /// `last-received-seq` (the resume's duplicate filter is skipped).
    ResendAllOnResume,
    /// A SEND resent after a resume (at or below the last accepted seq) is published again.
    RepublishResentSends,
    /// A session's subscriptions forget a delivery that arrives while it is detached.
    DropWhileDetached,
    /// A durable SEND is receipted as soon as its record is appended, before the log syncs it.
    ReceiptBeforeSync,
    /// A session whose credentials expired (a JWT's `exp`) is left open.
    CredentialsOutliveExpiry,
}

#[cfg(test)]
thread_local! {
    static PLANTED: std::cell::Cell<Option<Bug>> = const { std::cell::Cell::new(None) };
}

/// Whether `bug` is planted in this thread's broker (always false outside test builds).
#[cfg(test)]
pub fn planted(bug: Bug) -> bool {
    PLANTED.with(|planted| planted.get() == Some(bug))
}

/// Whether `bug` is planted in this thread's broker (always false outside test builds).
#[cfg(not(test))]
#[inline(always)]
pub fn planted(_bug: Bug) -> bool {
    false
}

/// Plants `bug` (or none) in this thread's broker until the next call.
#[cfg(test)]
pub fn plant(bug: Option<Bug>) {
    PLANTED.with(|planted| planted.set(bug));
}
