"""``mfd bench``'s command line and the settings it resolves to (``--quick`` included)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from mfd.errors import UsageError
from mfd.options import COMPRESSION, check_channels
from mfd.shm.workload import PATTERNS
from mfd.units import parse_size

MODES = ("save", "restore", "migrate", "live", "kvm", "postcopy", "all")
# kvm and postcopy are modes of their own: they need /dev/kvm, /dev/userfaultfd
ALL = ("save", "restore", "migrate", "live")
PAGE = 4096
ON_OFF = {"on": (True,), "off": (False,), "both": (True, False)}


def _size(text: str) -> int:
    size = parse_size(text)
    if size <= 0 or size % PAGE:
        raise argparse.ArgumentTypeError(f"size {text!r} is not a positive multiple of {PAGE}")
    return size


def _list(item, what: str, example: str):
    def parse(text: str) -> list:
        try:
            values = [item(x) for x in text.split(",") if x.strip()]
        except (ValueError, argparse.ArgumentTypeError):
            values = []
        if not values:
            raise argparse.ArgumentTypeError(f"bad {what} list {text!r} (e.g. {example})")
        return values
    return parse


def _channels(text: str) -> list[int]:
    chans = _list(int, "channel", "1,2,4")(text)
    try:
        for c in chans:
            check_channels(c)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return sorted(set(chans))


def _compressions(text: str) -> list[str]:
    comps = _list(str.strip, "compression", "none,zstd")(text)
    bad = [c for c in comps if c not in COMPRESSION]
    if bad:
        raise argparse.ArgumentTypeError(f"compression must be among {','.join(COMPRESSION)}, "
                                         f"got {text!r}")
    return list(dict.fromkeys(comps))


def _rates(text: str) -> list[int]:
    return sorted(set(_list(parse_size, "dirty rate", "0,100M,400M")(text)))


def _patterns(text: str) -> list[str]:
    def pattern(x: str) -> str:
        if x not in PATTERNS:
            raise ValueError(x)
        return x
    return list(dict.fromkeys(_list(pattern, "pattern", ",".join(PATTERNS))(text)))


def _fraction(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = -1.0
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in 0..1, got {text!r}")
    return x


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mode", choices=MODES, help="what to measure (all: every mode, in order)")
    p.add_argument("--size", type=_size,
                   help="RAM image size (default 2G, kvm and postcopy 1G; --quick 64M)")
    p.add_argument("--image", metavar="PATH",
                   help="a real RAM dump as the image (read only; its size is the RAM size)")
    p.add_argument("--zero", type=_fraction, default=0.5,
                   help="share of zero pages in the generated image (default 0.5)")
    p.add_argument("--random", type=_fraction, default=0.25,
                   help="share of random pages; the rest is compressible text (default 0.25)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--multifd-channels", type=_channels, metavar="N,N,...",
                   help="channel counts (default 1,2,4; --quick 1,2)")
    p.add_argument("--multifd-compression", type=_compressions, default=["none", "zstd"],
                   metavar="C,C,...", help="migrate: compressions (default none,zstd; zstd "
                   "at level 1)")
    p.add_argument("--direct-io", action="store_true",
                   help="save/restore: also measure O_DIRECT (both tools)")
    p.add_argument("--dirty-rate", type=_rates, metavar="R,R,...",
                   help="live: guest dirty rates, bytes/s (default 0,100M,400M; --quick 0,16M)")
    p.add_argument("--pattern", type=_patterns, metavar="P,P,...",
                   help="live: where the guest writes: random (any page), hotset (90%% of "
                   "the writes to 10%% of RAM), sequential (default random,hotset; --quick "
                   "random)")
    p.add_argument("--verify", choices=("on", "off", "both"),
                   help="live, migrate: mfd's RAM verification (off: mfd migrate --no-verify; "
                   "both: each mfd->mfd config both ways, the difference is its cost; "
                   "default on for live, both for migrate)")
    p.add_argument("--prealloc", choices=("off", "on", "both"), default="both",
                   help="migrate: the destination's RAM allocated and zeroed before the "
                   "migration, untimed (QEMU's memory-backend-file prealloc=on, 'mfd "
                   "incoming --prealloc'), or fresh RAM that fills as pages arrive (off), "
                   "or each pair both ways (default both)")
    p.add_argument("--pin", action="store_true",
                   help="migrate: also each pair with its source on one CPU and its "
                   "destination on another (the view two hosts give), beside the shared "
                   "CPUs")
    ac = p.add_mutually_exclusive_group()
    ac.add_argument("--auto-converge", dest="auto_converge", action="store_const",
                    const="on", help="live: only with auto-converge (default: with and without)")
    ac.add_argument("--no-auto-converge", dest="auto_converge", action="store_const",
                    const="off", help="live: only without auto-converge")
    p.add_argument("--live-timeout", type=float, metavar="SECONDS",
                   help="live: a migration not done by then counts as not converged "
                   "(default 60; --quick 20)")
    p.add_argument("--repeat", type=int, help="counted runs per config (default 3; --quick 1)")
    p.add_argument("--xbzrle", action="store_true",
                   help="live: each config without multifd, without and with XBZRLE (the "
                   "built-in guest, and the KVM guest where /dev/kvm works)")
    p.add_argument("--max-bandwidth", type=parse_size, default=0, metavar="RATE",
                   help="live: cap the link at RATE bytes/s (default 0: unlimited)")
    p.add_argument("--tls", action="store_true",
                   help="migrate: also each mfd->mfd and QEMU->QEMU config over TLS 1.3 "
                   "(x509 credentials made as 'mfd tls-certs' makes them), beside it in clear")
    p.add_argument("--against", choices=("qemu",),
                   help="also run QEMU 10 on the same image and settings, in the same run")
    p.add_argument("--out", default="mfd-bench", metavar="DIR",
                   help="where results.json, table.txt and the plots go (default ./mfd-bench)")
    p.add_argument("--dir", metavar="DIR", default="/var/tmp",
                   help="save/restore: parent of the work directory on the disk measured "
                   "(default /var/tmp)")
    p.add_argument("--quick", action="store_true",
                   help="small and fast: 64M, one repeat, no warm-up (proves it works)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")


@dataclass(frozen=True)
class Settings:
    modes: tuple[str, ...]
    size: int | None  # None with --image: the dump's size
    image: str | None
    zero: float
    random: float
    seed: int
    channels: tuple[int, ...]
    compressions: tuple[str, ...]
    direct_io: bool
    dirty_rates: tuple[int, ...]
    patterns: tuple[str, ...]
    verify: tuple[bool, ...]  # live's
    migrate_verify: tuple[bool, ...]
    prealloc: tuple[bool, ...]  # migrate: destination RAM fresh (False), allocated ahead
    pinned: tuple[bool, ...]  # migrate: both ends on the shared CPUs (False), each on its own
    auto_converge: tuple[bool, ...]
    live_timeout: float
    repeat: int
    warmup: int
    against_qemu: bool
    tls: bool
    xbzrle: bool
    max_bandwidth: int
    out: str
    workdir_parent: str
    quick: bool
    json: bool

    def as_json(self) -> dict[str, object]:
        return dict(self.__dict__)


def settings(args: argparse.Namespace) -> Settings:
    """The defaults that depend on ``--quick``, filled in; option conflicts refused."""
    from mfd.errors import UsageError

    q = args.quick
    if args.image and args.size:
        raise UsageError("mfd bench: --size and --image exclude each other (the dump's size "
                         "is the RAM size)")
    if args.zero + args.random > 1.0:
        raise UsageError("mfd bench: --zero + --random must not exceed 1")
    repeat = args.repeat if args.repeat is not None else (1 if q else 3)
    if repeat < 1:
        raise UsageError("mfd bench: --repeat must be at least 1")
    timeout = args.live_timeout if args.live_timeout is not None else (20.0 if q else 60.0)
    if timeout <= 0:
        raise UsageError("mfd bench: --live-timeout must be positive")
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        raise UsageError("mfd bench: --pin puts each end on a CPU of its own: this process "
                         f"may use {len(os.sched_getaffinity(0))} CPU")
    default = 64 << 20 if q else (1 << 30 if args.mode in ("kvm", "postcopy") else 2 << 30)
    size = None if args.image else (args.size or default)
    ac = {"on": (True,), "off": (False,), None: (False, True)}[args.auto_converge]
    return Settings(
        modes=ALL if args.mode == "all" else (args.mode,),
        size=size, image=args.image, zero=args.zero, random=args.random, seed=args.seed,
        channels=tuple(args.multifd_channels or ([1, 2] if q else [1, 2, 4])),
        compressions=tuple(args.multifd_compression), direct_io=args.direct_io,
        dirty_rates=tuple(args.dirty_rate or ([0, 16 << 20] if q else [0, 100 << 20,
                                                                      400 << 20])),
        patterns=tuple(args.pattern or (["random"] if q else ["random", "hotset"])),
        verify=ON_OFF[args.verify or "on"], migrate_verify=ON_OFF[args.verify or "both"],
        prealloc={"off": (False,), "on": (True,), "both": (False, True)}[args.prealloc],
        pinned=(False, True) if args.pin else (False,),
        auto_converge=ac, live_timeout=timeout, repeat=repeat, warmup=0 if q else 1,
        against_qemu=args.against == "qemu", tls=args.tls, xbzrle=args.xbzrle,
        max_bandwidth=args.max_bandwidth, out=args.out,
        workdir_parent=args.dir, quick=q, json=args.json)
