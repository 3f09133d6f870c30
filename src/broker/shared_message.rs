//! [`SharedMessage`]: a [`StoredMessage`] shared by reference count, as an `Arc` would share
//! it (the anycast queue, a subscriber's unacknowledged ring, the consumer's session and the
//! cluster's forwarder each hold a handle), but without an allocation per SEND.
//!
//! A message decoded from a client's SEND ([`SharedMessage::in_slab`]) takes the next slot of
//! the slab its thread is filling: one allocation of [`SLAB_SLOTS`] slots, taken when the
//! previous slab is full. Every other message (a recovered or dead-lettered one, a compacted
//! copy) gets a slot of its own ([`SharedMessage::new`]).
//!
//! Each slot counts its own handles. When its count falls to zero its message is dropped at
//! once (its tail, and the read buffer the tail is a slice of, is released exactly when an
//! `Arc<StoredMessage>` would release it), and the slot is gone from its slab; the slab's
//! memory is freed when all its slots are gone (its filler gives back the slots it never
//! used when it moves to the next slab, or when its thread ends). Handles are `Send` and
//! `Sync`: a SEND's message crosses to its address's owner shard over a channel, and
//! whichever thread drops a slot's last handle releases it (the counts are atomic, with the
//! orderings `Arc` uses).
//!
//! Memory bound: a slab is `SLAB_SLOTS` (14) slots of 72 bytes, 1,016 bytes, held until its
//! last message is gone. Only SENDs' messages go into slabs, and such a message holds a
//! buffer larger than a slab already: a binary SEND's its read buffer (at least
//! `IDLE_READ_BUFFER_BYTES`, 512 bytes; `read-buffer-bytes`, 64 KiB by default, while the
//! connection is busy), a text SEND's its thread's text chunk (64 KiB) or, when its tail is
//! over 8 KiB, that tail (`broker::text_tails`). So the slabs kept alive are bounded by the
//! buffers kept alive: at most one slab per live message that has not been compacted. A
//! message that waits long is compacted into a slot of its own (`address::compaction`), which
//! lets go of its slab as of its buffer.

use std::cell::Cell;
use std::fmt;
use std::ops::Deref;
use std::ptr::{self, NonNull};
use std::sync::atomic::{fence, AtomicUsize, Ordering};

use super::StoredMessage;

/// Slots per slab: the allocation a run of SENDs shares. 14 slots of 72 bytes and the count
/// make 1,016 bytes, so a slab is one of mimalloc's small allocations (at most 1 KiB; a
/// larger one takes its slower path every time, which cost about 35 instructions per SEND at
/// 16 slots), while a slab kept alive by one message stays near the size of the smallest
/// read buffer that message can hold.
pub const SLAB_SLOTS: usize = 14;

/// The largest allocation mimalloc serves from its per-thread small-object pages.
const SMALL_ALLOCATION_BYTES: usize = 1024;
const _: () = assert!(std::mem::size_of::<Slab>() <= SMALL_ALLOCATION_BYTES, "a slab must stay a small allocation");

/// A reference-counted handle to a stored message (see the module docs). Cloning it counts
/// one more handle; the message is immutable while it has more than one
/// ([`SharedMessage::get_mut`]).
pub struct SharedMessage {
    slot: NonNull<Slot>,
}

/// One message and the count of its handles.
struct Slot {
    /// Handles to this slot; the message is dropped when it falls to zero.
    handles: AtomicUsize,
    /// The slab the slot is part of, or null for a slot allocated on its own.
    slab: *mut Slab,
    message: StoredMessage,
}

/// `SLAB_SLOTS` slots in one allocation, handed out front to back by one thread's filler.
struct Slab {
    /// Slots not yet gone: those with handles, plus those its filler has not handed out yet.
    /// The slab is freed when it falls to zero.
    live: AtomicUsize,
    /// Initialised one by one as they are handed out; a slot is never reused.
    slots: [std::mem::MaybeUninit<Slot>; SLAB_SLOTS],
}

// SAFETY: a handle gives shared access to a `StoredMessage` (which is `Send + Sync`) and, when
// it is the only one, mutable access; its counts are atomic, so handles to one slot (or slots
// of one slab) may be cloned and dropped on different threads, as with `Arc<StoredMessage>`.
unsafe impl Send for SharedMessage {}
// SAFETY: as above: `&SharedMessage` only reads the message and increments an atomic count.
unsafe impl Sync for SharedMessage {}

impl SharedMessage {
    /// A message with a slot of its own (one allocation, as `Arc::new`).
    pub fn new(message: StoredMessage) -> SharedMessage {
        let slot = Box::new(Slot { handles: AtomicUsize::new(1), slab: ptr::null_mut(), message });
        SharedMessage { slot: NonNull::from(Box::leak(slot)) }
    }

    /// A message in the next slot of this thread's slab: for a SEND's message, whose tail is a
    /// slice of a connection's read buffer (binary) or of a text chunk (text; see the module
    /// docs for why only those).
    ///
    /// Inline: the message is written into its slot where the caller builds it, not moved
    /// through a call first.
    #[inline]
    pub fn in_slab(message: StoredMessage) -> SharedMessage {
        match FILLER.try_with(|filler| filler.next_slot()) {
            // SAFETY: `next_slot` returned a slot of a live slab that no one else has been
            // given; it is written once here, before any handle to it exists.
            Ok((slab, slot)) => unsafe {
                slot.write(Slot { handles: AtomicUsize::new(1), slab, message });
                SharedMessage { slot }
            },
            // The thread is ending (its filler is gone): an allocation of its own.
            Err(_) => SharedMessage::new(message),
        }
    }

    fn slot(&self) -> &Slot {
        // SAFETY: this handle counts in `handles`, so the slot is initialised and its message
        // not dropped; the slot is only written through `get_mut`, which needs the only handle.
        unsafe { self.slot.as_ref() }
    }

    /// The message, mutably, when this is its only handle (as `Arc::get_mut`).
    pub fn get_mut(this: &mut SharedMessage) -> Option<&mut StoredMessage> {
        // Acquire: the other handles' drops (Release) happen before this access.
        if this.slot().handles.load(Ordering::Acquire) != 1 {
            return None;
        }
        // SAFETY: this is the slot's only handle and it is borrowed mutably, so no other
        // reference to the slot exists, and none can be made while the borrow lasts.
        Some(unsafe { &mut this.slot.as_mut().message })
    }

    /// The message, mutably, when this is its only handle and its slot is its own (not in a
    /// slab): a message that will wait long may be changed in place (compacted) only then,
    /// for in a slab it would keep the slab alive as long as it waits.
    pub fn get_mut_own_slot(this: &mut SharedMessage) -> Option<&mut StoredMessage> {
        if !this.slot().slab.is_null() {
            return None;
        }
        SharedMessage::get_mut(this)
    }

    /// Whether two handles are to the same message (as `Arc::ptr_eq`).
    pub fn ptr_eq(this: &SharedMessage, other: &SharedMessage) -> bool {
        this.slot == other.slot
    }

    /// Releases the slot whose last handle was just dropped.
    ///
    /// # Safety
    /// `slot` is initialised, and its count of handles has just fallen to zero (with the
    /// Acquire fence that makes the other handles' last uses happen before).
    #[inline(never)]
    unsafe fn release(slot: NonNull<Slot>) {
        let slot = slot.as_ptr();
        // SAFETY: the slot is initialised (the caller's contract); reading its slab pointer
        // does not touch other slots.
        let slab = unsafe { (*slot).slab };
        if slab.is_null() {
            // SAFETY: a slot without a slab was allocated by `SharedMessage::new` as a `Box`,
            // and no handle to it is left.
            drop(unsafe { Box::from_raw(slot) });
            return;
        }
        let message = slot.wrapping_byte_add(std::mem::offset_of!(Slot, message)).cast::<StoredMessage>();
        // SAFETY: no handle to the slot is left, so its message is dropped exactly once, here;
        // the slot's memory stays the slab's until the slab is freed.
        unsafe { ptr::drop_in_place(message) };
        // SAFETY: the slot counted in its slab's `live` until now.
        unsafe { Slab::release(slab, 1) };
    }
}

impl Slab {
    /// Once per `SLAB_SLOTS` SENDs: out of line, so that what `in_slab` inlines is small.
    #[inline(never)]
    fn allocate() -> *mut Slab {
        let layout = std::alloc::Layout::new::<Slab>();
        // SAFETY: `Slab` is not zero-sized.
        let slab = unsafe { std::alloc::alloc(layout) }.cast::<Slab>();
        if slab.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        // SAFETY: `slab` is a fresh allocation of a `Slab`; `live` is written before anything
        // reads it, the slots as they are handed out.
        unsafe { Slab::live(slab).write(AtomicUsize::new(SLAB_SLOTS)) };
        slab
    }

    /// Where the slab's count of live slots is (no reference made, so nothing is asserted
    /// about the slots).
    fn live(slab: *mut Slab) -> *mut AtomicUsize {
        slab.wrapping_byte_add(std::mem::offset_of!(Slab, live)).cast()
    }

    /// `gone` of the slab's slots are gone (released, or never handed out); frees the slab
    /// when none is left.
    ///
    /// # Safety
    /// `slab` is live and `gone` of the slots still counted in its `live` are given up by the
    /// caller (each slot is given up once).
    unsafe fn release(slab: *mut Slab, gone: usize) {
        // SAFETY: the slab is live (the caller's contract), so `live` is initialised; only this
        // field is referenced, not the slots other threads may be using.
        let live = unsafe { &*Slab::live(slab) };
        if live.fetch_sub(gone, Ordering::Release) != gone {
            return;
        }
        // Every slot's release (Release) happens before the slab is freed.
        fence(Ordering::Acquire);
        // SAFETY: no slot of the slab is counted any more: no handle and no filler uses it,
        // and every message in it was dropped; it was allocated with this layout.
        unsafe { std::alloc::dealloc(slab.cast(), std::alloc::Layout::new::<Slab>()) };
    }
}

impl Clone for SharedMessage {
    fn clone(&self) -> SharedMessage {
        // Relaxed, as `Arc::clone`: a new handle is made from an existing one, which keeps
        // the slot alive meanwhile.
        let before = self.slot().handles.fetch_add(1, Ordering::Relaxed);
        if before > isize::MAX as usize {
            // As `Arc`: a count this high can only come from leaked handles.
            std::process::abort();
        }
        SharedMessage { slot: self.slot }
    }
}

impl SharedMessage {
    /// A new handle, with `later` more handles counted by the same atomic addition, to be made
    /// afterwards with [`SharedMessage::counted_clone`] (each exactly once). A multicast
    /// client-ack delivery hands one handle to the consumer and keeps one as its
    /// unacknowledged record: one locked addition for the two instead of two. A locked
    /// addition waits for the core's pending stores, which fan-out fills with arena and ring
    /// writes, so each one saved counts (docs/PERFORMANCE.md, session 15). A counted handle
    /// never made is a leak (the message is never released), never a fault.
    #[inline]
    pub fn clone_counting(&self, later: usize) -> SharedMessage {
        // Relaxed, as `Clone::clone` (this handle keeps the slot alive meanwhile).
        let before = self.slot().handles.fetch_add(1 + later, Ordering::Relaxed);
        if before > isize::MAX as usize {
            // As `Clone::clone`: a count this high can only come from leaked handles.
            std::process::abort();
        }
        SharedMessage { slot: self.slot }
    }

    /// A handle that [`SharedMessage::clone_counting`] already counted: no atomic operation.
    ///
    /// # Safety
    ///
    /// One of the `later` handles a `clone_counting` of this same message counted must be
    /// still unmade, and this call makes it: every handle made here matches one counted
    /// there, so the count never falls below the handles alive.
    #[inline]
    pub unsafe fn counted_clone(&self) -> SharedMessage {
        SharedMessage { slot: self.slot }
    }
}

impl Drop for SharedMessage {
    fn drop(&mut self) {
        if self.slot().handles.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        // The other handles' uses (before their Release) happen before the release.
        fence(Ordering::Acquire);
        // SAFETY: this was the slot's last handle.
        unsafe { SharedMessage::release(self.slot) };
    }
}

impl Deref for SharedMessage {
    type Target = StoredMessage;

    fn deref(&self) -> &StoredMessage {
        &self.slot().message
    }
}

impl fmt::Debug for SharedMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        StoredMessage::fmt(self, f)
    }
}

/// The slab a thread fills ([`SharedMessage::in_slab`]).
struct Filler {
    slab: Cell<*mut Slab>,
    /// The next slot to hand out; `SLAB_SLOTS` when there is no slab to fill (the last one
    /// is full, or none was taken yet): `slab` is not to be used then.
    next: Cell<usize>,
}

impl Filler {
    /// The next free slot (taking a new slab when the current one is full), with its slab.
    fn next_slot(&self) -> (*mut Slab, NonNull<Slot>) {
        let mut next = self.next.get();
        if next == SLAB_SLOTS {
            self.slab.set(Slab::allocate());
            next = 0;
        }
        let slab = self.slab.get();
        self.next.set(next + 1);
        // `slab` is live: its slot `next` and those after it are still counted in its `live`
        // for this filler.
        let slot = slab.wrapping_byte_add(std::mem::offset_of!(Slab, slots)).cast::<Slot>().wrapping_add(next);
        // SAFETY: a pointer into a live allocation is not null.
        (slab, unsafe { NonNull::new_unchecked(slot) })
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        let unused = SLAB_SLOTS - self.next.get();
        if unused > 0 {
            // SAFETY: the slab is live while it has slots this filler has not handed out, and
            // those are given up here, once.
            unsafe { Slab::release(self.slab.get(), unused) };
        }
    }
}

thread_local! {
    static FILLER: Filler = const { Filler { slab: Cell::new(ptr::null_mut()), next: Cell::new(SLAB_SLOTS) } };
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message(body: &str) -> StoredMessage {
        StoredMessage::from_fields(b"a", &Default::default(), body.as_bytes(), false)
    }

    /// A binary SEND's payload, and its message decoded from it: the tail is a slice of the
    /// payload, as a decoded SEND's is of its read buffer.
    fn decoded_send(body: &'static [u8]) -> (Bytes, StoredMessage) {
        let send = crate::mbws::Frame::Send(crate::mbws::Send {
            seq: 1,
            address: Bytes::from_static(b"a"),
            body: Bytes::from_static(body),
            ..Default::default()
        });
        let payload = crate::mbws::encode(crate::mbws::Binding::Binary, &send).freeze();
        let decoded = crate::mbws::binary::decode_send(payload.clone(), &Default::default()).expect("a valid SEND");
        (payload, StoredMessage::new(decoded.tail, false, 0, false))
    }

    #[test]
    fn a_slab_message_reads_as_its_own_and_outlives_the_rest_of_its_slab() {
        let messages: Vec<SharedMessage> =
            (0..SLAB_SLOTS * 2 + 3).map(|index| SharedMessage::in_slab(message(&format!("m{index}")))).collect();
        let kept: Vec<SharedMessage> = messages.iter().step_by(5).cloned().collect();
        drop(messages);
        for (index, kept) in kept.iter().enumerate() {
            assert_eq!(kept.body(), format!("m{}", index * 5).as_bytes());
        }
    }

    #[test]
    fn the_last_handle_releases_the_read_buffer_while_the_slab_lives_on() {
        let first = SharedMessage::in_slab(message("first"));
        let (payload, decoded) = decoded_send(b"second");
        let second = SharedMessage::in_slab(decoded);
        let second_copy = second.clone();
        drop(second);
        assert_eq!(second_copy.body(), b"second");
        assert!(!payload.is_unique(), "the message holds its read buffer");
        drop(second_copy);
        assert!(payload.is_unique(), "its last handle let go of the read buffer, its slab still alive");
        assert_eq!(first.body(), b"first");
    }

    #[test]
    fn handles_counted_ahead_keep_the_message_until_the_last_one_made_is_dropped() {
        let (payload, decoded) = decoded_send(b"shared");
        let original = SharedMessage::in_slab(decoded);
        let delivered = original.clone_counting(1);
        // SAFETY: `clone_counting(1)` above counted this one handle.
        let kept = unsafe { original.counted_clone() };
        let mut only = SharedMessage::new(message("alone"));
        let first = only.clone_counting(1);
        // SAFETY: as above, for `only`.
        let second = unsafe { only.counted_clone() };
        assert!(SharedMessage::get_mut(&mut only).is_none(), "three handles");
        drop((first, second));
        assert!(SharedMessage::get_mut(&mut only).is_some(), "the two counted handles are gone");
        drop(original);
        drop(delivered);
        assert_eq!(kept.body(), b"shared");
        assert!(!payload.is_unique(), "the last handle still holds the read buffer");
        drop(kept);
        assert!(payload.is_unique(), "the last handle let go of the read buffer");
    }

    #[test]
    fn handles_cross_threads_and_the_last_one_anywhere_releases_the_message() {
        let shared: Vec<SharedMessage> =
            (0..40).map(|index| SharedMessage::in_slab(message(&index.to_string()))).collect();
        let copies = shared.clone();
        let lengths: usize = shared.iter().map(|message| message.body().len()).sum();
        let (filler_done, wait_for_filler) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            // A slab of the other thread's too, left partly filled when it ends.
            let own = SharedMessage::in_slab(message("theirs"));
            // The filling thread has dropped its handles: these copies are the last, so the
            // messages and slabs of the first thread are released on this one.
            wait_for_filler.recv().unwrap();
            copies.iter().map(|message| message.body().len()).sum::<usize>() + own.body().len()
        });
        drop(shared);
        filler_done.send(()).unwrap();
        assert_eq!(other.join().unwrap(), lengths + "theirs".len());
    }

    #[test]
    fn only_the_sole_handle_may_change_the_message_and_only_in_its_own_slot_when_asked() {
        let mut own = SharedMessage::new(message("own"));
        let copy = own.clone();
        assert!(SharedMessage::get_mut(&mut own).is_none());
        drop(copy);
        SharedMessage::get_mut(&mut own).unwrap().expires_at_ms = 5;
        assert_eq!(own.expires_at_ms, 5);
        assert!(SharedMessage::get_mut_own_slot(&mut own).is_some());
        let mut in_slab = SharedMessage::in_slab(message("slab"));
        assert!(SharedMessage::get_mut(&mut in_slab).is_some());
        assert!(SharedMessage::get_mut_own_slot(&mut in_slab).is_none(), "compacting it in place would keep its slab");
        assert!(SharedMessage::ptr_eq(&in_slab, &in_slab.clone()));
        assert!(!SharedMessage::ptr_eq(&in_slab, &own));
    }
}
