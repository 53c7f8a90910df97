use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::GuestMemoryMmap;

use super::*;

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;

fn memory() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn limits() -> Limits {
    Limits {
        capacity: 1 << 20,
        readonly: false,
        max_descriptors: 16,
        serial: *b"serial-number-000001",
    }
}

fn header(mem: &GuestMemory, at: u64, kind: u32, sector: u64) {
    let mut raw = [0u8; 16];
    raw[0..4].copy_from_slice(&kind.to_le_bytes());
    raw[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(at)).unwrap();
}

fn run(mem: &GuestMemory, limits: &Limits, descs: &[Descriptor]) -> Parsed {
    parse(
        7,
        descs.iter().copied(),
        mem,
        limits,
        &mut Scratch::default(),
    )
}

fn d(addr: u64, len: u32, flags: u16) -> Descriptor {
    Descriptor::new(addr, len, flags, 0)
}

#[test]
fn read_request() {
    let mem = memory();
    header(&mem, 0x1000, VIRTIO_BLK_T_IN, 2);
    let parsed = run(
        &mem,
        &limits(),
        &[
            d(0x1000, 16, NEXT),
            d(0x2000, 4096, WRITE | NEXT),
            d(0x3000, 1, WRITE),
        ],
    );
    let Parsed::Io(request) = parsed else {
        panic!("{parsed:?}")
    };
    assert_eq!(request.status, GuestAddress(0x3000));
    assert_eq!(
        request.operation,
        Operation::Read {
            offset: 1024,
            data: vec![Segment {
                addr: GuestAddress(0x2000),
                len: 4096
            }]
        }
    );
    assert_eq!(request.used_len_ok(), 4097);
}

#[test]
fn any_layout_write_with_header_and_data_in_one_descriptor() {
    let mem = memory();
    header(&mem, 0x1000, VIRTIO_BLK_T_OUT, 0);
    // Header and 512 data bytes in one readable descriptor; data, then status in one writable.
    let parsed = run(
        &mem,
        &limits(),
        &[d(0x1000, 16 + 512, NEXT), d(0x3000, 1, WRITE)],
    );
    let Parsed::Io(request) = parsed else {
        panic!("{parsed:?}")
    };
    assert_eq!(
        request.operation,
        Operation::Write {
            offset: 0,
            data: vec![Segment {
                addr: GuestAddress(0x1010),
                len: 512
            }]
        }
    );
    // Read data and status sharing the last descriptor.
    header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
    let parsed = run(
        &mem,
        &limits(),
        &[d(0x1000, 16, NEXT), d(0x4000, 513, WRITE)],
    );
    let Parsed::Io(request) = parsed else {
        panic!("{parsed:?}")
    };
    assert_eq!(request.status, GuestAddress(0x4200));
    assert_eq!(
        request.operation,
        Operation::Read {
            offset: 0,
            data: vec![Segment {
                addr: GuestAddress(0x4000),
                len: 512
            }]
        }
    );
}

fn status_of(parsed: &Parsed) -> Option<u8> {
    match parsed {
        Parsed::Done { status, .. } => Some(*status),
        _ => None,
    }
}

#[test]
fn bounds_and_sizes() {
    let mem = memory();
    let limits = limits();
    // Past the end of the 1 MiB disk.
    header(&mem, 0x1000, VIRTIO_BLK_T_IN, 2047);
    let parsed = run(
        &mem,
        &limits,
        &[
            d(0x1000, 16, NEXT),
            d(0x2000, 1024, WRITE | NEXT),
            d(0x3000, 1, WRITE),
        ],
    );
    assert_eq!(status_of(&parsed), Some(STATUS_IOERR));
    // Sector number that overflows when turned into bytes.
    header(&mem, 0x1000, VIRTIO_BLK_T_IN, u64::MAX / 2);
    let parsed = run(
        &mem,
        &limits,
        &[
            d(0x1000, 16, NEXT),
            d(0x2000, 512, WRITE | NEXT),
            d(0x3000, 1, WRITE),
        ],
    );
    assert_eq!(status_of(&parsed), Some(STATUS_IOERR));
    // Not a multiple of 512.
    header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
    let parsed = run(
        &mem,
        &limits,
        &[
            d(0x1000, 16, NEXT),
            d(0x2000, 100, WRITE | NEXT),
            d(0x3000, 1, WRITE),
        ],
    );
    assert_eq!(status_of(&parsed), Some(STATUS_IOERR));
    // Short header.
    let parsed = run(&mem, &limits, &[d(0x1000, 8, NEXT), d(0x3000, 1, WRITE)]);
    assert_eq!(status_of(&parsed), Some(STATUS_IOERR));
    // Unknown type.
    header(&mem, 0x1000, 0x55, 0);
    let parsed = run(&mem, &limits, &[d(0x1000, 16, NEXT), d(0x3000, 1, WRITE)]);
    assert_eq!(status_of(&parsed), Some(STATUS_UNSUPP));
}

#[test]
fn malformed_chains() {
    let mem = memory();
    let limits = limits();
    header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
    // Data outside guest memory: IOERR, status still reachable.
    let parsed = run(
        &mem,
        &limits,
        &[
            d(0x1000, 16, NEXT),
            d(1 << 30, 512, WRITE | NEXT),
            d(0x3000, 1, WRITE),
        ],
    );
    assert_eq!(status_of(&parsed), Some(STATUS_IOERR));
    // Status not writable: nothing can be reported.
    let parsed = run(&mem, &limits, &[d(0x1000, 16, NEXT), d(0x3000, 1, 0)]);
    assert!(matches!(parsed, Parsed::Drop { .. }), "{parsed:?}");
    // Status outside memory.
    let parsed = run(&mem, &limits, &[d(0x1000, 16, NEXT), d(1 << 30, 1, WRITE)]);
    assert!(matches!(parsed, Parsed::Drop { .. }), "{parsed:?}");
    // Truncated chain (the last descriptor still says NEXT: a loop or a bad index).
    let parsed = run(
        &mem,
        &limits,
        &[d(0x1000, 16, NEXT), d(0x3000, 1, WRITE | NEXT)],
    );
    assert!(matches!(parsed, Parsed::Drop { .. }), "{parsed:?}");
    // Too long.
    let many: Vec<Descriptor> = (0..40).map(|_| d(0x1000, 16, NEXT)).collect();
    assert!(matches!(run(&mem, &limits, &many), Parsed::Drop { .. }));
    // Readable after writable.
    let parsed = run(
        &mem,
        &limits,
        &[
            d(0x1000, 16, NEXT),
            d(0x2000, 512, WRITE | NEXT),
            d(0x2000, 512, NEXT),
            d(0x3000, 1, WRITE),
        ],
    );
    assert_eq!(status_of(&parsed), Some(STATUS_IOERR));
    // Empty.
    assert!(matches!(run(&mem, &limits, &[]), Parsed::Drop { .. }));
    // Address overflow on the status byte.
    let parsed = run(&mem, &limits, &[d(u64::MAX, 2, WRITE)]);
    assert!(matches!(parsed, Parsed::Drop { .. }), "{parsed:?}");
}

#[test]
fn readonly_and_get_id() {
    let mem = memory();
    let mut limits = limits();
    limits.readonly = true;
    header(&mem, 0x1000, VIRTIO_BLK_T_OUT, 0);
    let parsed = run(
        &mem,
        &limits,
        &[d(0x1000, 16 + 512, NEXT), d(0x3000, 1, WRITE)],
    );
    assert_eq!(status_of(&parsed), Some(STATUS_IOERR));
    header(&mem, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
    let parsed = run(&mem, &limits, &[d(0x1000, 32, NEXT), d(0x3000, 1, WRITE)]);
    assert_eq!(status_of(&parsed), Some(STATUS_UNSUPP));

    header(&mem, 0x1000, VIRTIO_BLK_T_GET_ID, 0);
    let parsed = run(
        &mem,
        &limits,
        &[
            d(0x1000, 16, NEXT),
            d(0x2000, 20, WRITE | NEXT),
            d(0x3000, 1, WRITE),
        ],
    );
    assert!(
        matches!(
            parsed,
            Parsed::Done {
                status: STATUS_OK,
                used_len: 21,
                ..
            }
        ),
        "{parsed:?}"
    );
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(0x2000)).unwrap();
    assert_eq!(&id, b"serial-number-000001");
}

#[test]
fn discard_segments() {
    let mem = memory();
    let limits = limits();
    let segment = |at: u64, sector: u64, sectors: u32, flags: u32| {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&sector.to_le_bytes());
        raw[8..12].copy_from_slice(&sectors.to_le_bytes());
        raw[12..16].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(at)).unwrap();
    };
    header(&mem, 0x1000, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    segment(0x1010, 8, 8, 0);
    segment(0x1020, 64, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let parsed = run(&mem, &limits, &[d(0x1000, 48, NEXT), d(0x3000, 1, WRITE)]);
    let Parsed::Io(request) = parsed else {
        panic!("{parsed:?}")
    };
    let Operation::Fallocate { ranges } = request.operation else {
        panic!()
    };
    assert_eq!(ranges.len(), 2);
    assert_eq!(
        ranges[0],
        Range {
            offset: 4096,
            len: 4096,
            mode: libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        }
    );
    assert_eq!(
        ranges[1].mode,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    );

    // Discard with the UNMAP flag, a bad length, and a range beyond the disk.
    header(&mem, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
    segment(0x1010, 8, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(
        status_of(&run(
            &mem,
            &limits,
            &[d(0x1000, 32, NEXT), d(0x3000, 1, WRITE)]
        )),
        Some(STATUS_UNSUPP)
    );
    assert_eq!(
        status_of(&run(
            &mem,
            &limits,
            &[d(0x1000, 30, NEXT), d(0x3000, 1, WRITE)]
        )),
        Some(STATUS_UNSUPP)
    );
    segment(0x1010, 2040, 16, 0);
    assert_eq!(
        status_of(&run(
            &mem,
            &limits,
            &[d(0x1000, 32, NEXT), d(0x3000, 1, WRITE)]
        )),
        Some(STATUS_IOERR)
    );
}
