//! Loading the programs, attaching them, and writing the maps.

use std::collections::BTreeMap;
use std::net::IpAddr;

use aya::maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray};
use aya::programs::tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions, TcHandle};
use aya::programs::{Link, ProgramError, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use ipnet::IpNet;

use super::maps::{
    policy_key, prefix_key, Addr16, ConfigRaw, EndpointRaw, MetricsRaw, PolicyDropKey,
    PolicyKeyData, PolicyValueRaw, RemoteRaw, CFG_ENABLED, CFG_REFUSE_PLAINTEXT, CFG_STRICT,
    IDENTITY_MAX, REMOTE_HAS_PEER, REMOTE_LOCAL,
};
use super::sync::diff;
use super::{key_str, mss_for_mtu, DatapathConfig, EndpointValue, Error, Reason, RemoteValue};
use crate::identity::Identity;
use crate::policy::compile::{EntryKey, EntryValue};
use crate::policy::Compiled;

/// (source identity, destination identity, direction of the failed check, reason).
pub type PolicyDrop = (u32, u32, crate::policy::Direction, Reason);

/// Packets that passed identity policy, per direction enforced.
pub type PolicyAllowed = BTreeMap<crate::policy::Direction, u64>;

/// The linked object built by build.rs (both programs, one set of maps).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/veil.bpf.o"));

const FROM_POD: &str = "from_pod";
const TO_POD: &str = "to_pod";
const INTO_POD: &str = "into_pod";

/// The two TC priorities `from_pod` alternates between on a pod veth. A new
/// agent attaches at the free one, then deletes the other: there is always a
/// Veil filter in place, and with direct-action the first one that returns
/// a verdict ends the chain (net/sched/cls_bpf.c), so two at once is harmless.
/// They are reserved for Veil on pod veths.
pub const POD_FILTER_PRIORITIES: [u16; 2] = [0x5e00, 0x5e01];
const POD_FILTER_HANDLE: TcHandle = TcHandle::new(0, 1);

/// Which program, for [`Datapath::classifier`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// `from_pod`, pod veth ingress.
    FromPod,
    /// `to_pod`, TUN ingress.
    ToPod,
    /// `into_pod`, pod veth egress.
    IntoPod,
}

impl Hook {
    const fn name(self) -> &'static str {
        match self {
            Hook::FromPod => FROM_POD,
            Hook::ToPod => TO_POD,
            Hook::IntoPod => INTO_POD,
        }
    }

    /// Where the hook sits on a pod veth (`to_pod` is not on one).
    const fn pod_side(self) -> TcAttachType {
        match self {
            Hook::IntoPod => TcAttachType::Egress,
            Hook::FromPod | Hook::ToPod => TcAttachType::Ingress,
        }
    }
}

/// The loaded datapath. Dropping it detaches `to_pod` from the TUN but leaves
/// every `from_pod` filter in place (fail closed; see [`Datapath::attach_pod`]).
pub struct Datapath {
    bpf: Ebpf,
    endpoints: HashMap<MapData, Addr16, EndpointRaw>,
    remote: LpmTrie<MapData, Addr16, RemoteRaw>,
    ipcache: HashMap<MapData, Addr16, u32>,
    config: Array<MapData, ConfigRaw>,
    metrics: PerCpuArray<MapData, MetricsRaw>,
    policy: LpmTrie<MapData, PolicyKeyData, PolicyValueRaw>,
    cidr: LpmTrie<MapData, Addr16, u32>,
    policy_drops: HashMap<MapData, PolicyDropKey, u64>,
    policy_allowed: PerCpuArray<MapData, u64>,
    cur_policy: BTreeMap<EntryKey, EntryValue>,
    cur_cidr: BTreeMap<IpNet, Identity>,
    // What this process wrote; the maps are created fresh by load(), so this
    // is exactly the kernel's content and diffs need no map walk.
    cur_endpoints: BTreeMap<IpAddr, EndpointValue>,
    cur_remote: BTreeMap<IpNet, RemoteValue>,
    cur_ipcache: BTreeMap<IpAddr, u32>,
    tun_link: Option<SchedClassifierLinkId>,
    /// ifindex of the device `to_pod` is attached to (0: none).
    tun_attached: u32,
    /// The last configuration the agent set.
    cfg: Option<DatapathConfig>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("endpoints", &self.cur_endpoints.len())
            .field("remote", &self.cur_remote.len())
            .field("ipcache", &self.cur_ipcache.len())
            .field("tun_attached", &self.tun_link.is_some())
            .finish()
    }
}

fn take_map<T>(bpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = bpf.take_map(name).ok_or(Error::MissingMap {
        name,
        source: Box::new(MapError::InvalidName { name: name.into() }),
    })?;
    T::try_from(map).map_err(|source| Error::MissingMap {
        name,
        source: Box::new(source),
    })
}

fn netlink_errno(e: &ProgramError) -> Option<i32> {
    match e {
        ProgramError::TcError(tc::TcError::NetlinkError(n)) | ProgramError::NetlinkError(n) => {
            n.raw_os_error()
        }
        ProgramError::TcError(tc::TcError::IoError(io)) | ProgramError::IOError(io) => {
            io.raw_os_error()
        }
        _ => None,
    }
}

fn ifindex(ifname: &str) -> Result<u32, Error> {
    let c = std::ffi::CString::new(ifname).map_err(|e| Error::Interface {
        ifname: ifname.into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    })?;
    // SAFETY: if_nametoindex reads a valid NUL-terminated string and has no
    // other preconditions.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(Error::Interface {
            ifname: ifname.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(idx)
}

/// Whether `object` has CO-RE relocations, the only use aya makes of the
/// kernel's BTF while loading.
fn needs_kernel_btf(object: &[u8]) -> Result<bool, Error> {
    let obj = aya_obj::Object::parse(object)
        .map_err(|e| Error::Load(Box::new(aya::EbpfError::from(e))))?;
    Ok(obj.has_btf_relocations())
}

impl Datapath {
    /// Loads both programs and creates the maps; nothing is attached yet.
    /// Encryption starts disabled (an all-zero `veil_config`).
    pub fn load() -> Result<Self, Error> {
        // The kernel's BTF (/sys/kernel/btf/vmlinux: 5.5 MB on 6.18, ~13 MB
        // of heap once parsed, ~19 MB while parsing, per heaptrack) serves
        // aya only for CO-RE relocations (`EbpfLoader::load` passes it to
        // nothing but `relocate_btf`). `Ebpf::load` parses it twice, the
        // second copy while the first is still held: that pair was the
        // agent's peak memory. aya 0.14 has no loader that skips the parse in
        // `EbpfLoader::new`, so that one copy is dropped right away when the
        // object has no CO-RE relocations (ours has none: it reads packets,
        // not kernel structs); an object with some keeps it and is relocated
        // against it as before.
        let mut loader = EbpfLoader::new();
        if !needs_kernel_btf(OBJECT)? {
            loader.btf(None);
        }
        let mut bpf = loader.load(OBJECT).map_err(|e| Error::Load(Box::new(e)))?;
        for name in [FROM_POD, TO_POD, INTO_POD] {
            let prog: &mut SchedClassifier = bpf
                .program_mut(name)
                .ok_or(Error::MissingProgram { name })?
                .try_into()
                .map_err(|_| Error::MissingProgram { name })?;
            prog.load().map_err(|source| Error::Verify {
                name,
                source: Box::new(source),
            })?;
        }
        let endpoints = take_map(&mut bpf, "veil_endpoints")?;
        let remote = take_map(&mut bpf, "veil_remote")?;
        let ipcache = take_map(&mut bpf, "veil_ipcache")?;
        let config = take_map(&mut bpf, "veil_config")?;
        let metrics = take_map(&mut bpf, "veil_metrics")?;
        let policy = take_map(&mut bpf, "veil_policy")?;
        let cidr = take_map(&mut bpf, "veil_cidr")?;
        let policy_drops = take_map(&mut bpf, "veil_policy_drops")?;
        let policy_allowed = take_map(&mut bpf, "veil_policy_allowed")?;
        Ok(Self {
            policy_allowed,
            policy,
            cidr,
            policy_drops,
            cur_policy: BTreeMap::new(),
            cur_cidr: BTreeMap::new(),
            bpf,
            endpoints,
            remote,
            ipcache,
            config,
            metrics,
            cur_endpoints: BTreeMap::new(),
            cur_remote: BTreeMap::new(),
            cur_ipcache: BTreeMap::new(),
            tun_link: None,
            tun_attached: 0,
            cfg: None,
        })
    }

    fn prog_mut(&mut self, hook: Hook) -> Result<&mut SchedClassifier, Error> {
        let name = hook.name();
        self.bpf
            .program_mut(name)
            .ok_or(Error::MissingProgram { name })?
            .try_into()
            .map_err(|_| Error::MissingProgram { name })
    }

    /// A loaded program, e.g. to run it with `aya::programs::TestRun`.
    pub fn classifier(&self, hook: Hook) -> Result<&SchedClassifier, Error> {
        let name = hook.name();
        self.bpf
            .program(name)
            .ok_or(Error::MissingProgram { name })?
            .try_into()
            .map_err(|_| Error::MissingProgram { name })
    }

    /// Attaches `to_pod` at TC ingress of the TUN. Uses TCX: the link lives
    /// as long as this `Datapath`, like the TUN itself. Re-attaching replaces
    /// the previous attachment.
    ///
    /// `to_pod` recognises the TUN (no L2 header) by `veil_config.tun_ifindex`,
    /// so this also records the device's ifindex there; [`Self::set_config`]
    /// may then pass `tun_ifindex: 0`, and the two calls may come in either order.
    pub fn attach_tun(&mut self, ifname: &str) -> Result<(), Error> {
        let idx = ifindex(ifname)?;
        if let Some(cfg) = self.cfg {
            if cfg.tun_ifindex != 0 && cfg.tun_ifindex != idx {
                return Err(Error::Config(format!(
                    "`{ifname}` has ifindex {idx} but the config names TUN ifindex {}",
                    cfg.tun_ifindex
                )));
            }
        }
        let old = self.tun_link.take();
        let prog = self.prog_mut(Hook::ToPod)?;
        if let Some(old) = old {
            // Best effort: the old TUN may be gone, taking the link with it.
            let _ = prog.detach(old);
        }
        let id = prog
            .attach(ifname, TcAttachType::Ingress)
            .map_err(|source| Error::Attach {
                action: "attaching",
                prog: TO_POD,
                ifname: ifname.into(),
                source: Box::new(source),
            })?;
        self.tun_link = Some(id);
        self.tun_attached = idx;
        self.write_config()
    }

    /// Attaches `from_pod` at TC ingress and `into_pod` at TC egress of a
    /// pod's host-side veth, adding the clsact qdisc if missing.
    ///
    /// Fail closed across agent exit: the filter is a netlink (cls_bpf)
    /// filter, which holds its own reference on the program and maps, and is
    /// never detached on drop. If the agent dies, remote-pod traffic keeps
    /// being redirected into a TUN that no longer exists and is dropped,
    /// never sent in plaintext. A restarted agent replaces its predecessor's
    /// filter without a gap by alternating between [`POD_FILTER_PRIORITIES`].
    ///
    /// Order matters on a restart: the new filter replaces the old one at
    /// once and runs on *this* `Datapath`'s maps, so call [`Self::set_config`]
    /// and the `sync_*` methods first; attaching with empty maps would let
    /// remote-pod traffic out in plaintext until they are filled.
    pub fn attach_pod(&mut self, ifname: &str) -> Result<(), Error> {
        ifindex(ifname)?;
        if self.cfg.is_none() {
            tracing::warn!(
                ifname,
                "attaching from_pod before set_config: encryption is off on this veth until configured"
            );
        }
        match tc::qdisc_add_clsact(ifname) {
            Ok(()) => {}
            Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => {
                return Err(Error::Qdisc {
                    ifname: ifname.into(),
                    source: Box::new(source),
                })
            }
        }
        // into_pod first: from_pod is what a restart must never lose, and
        // an error here leaves the predecessor's from_pod in place.
        self.swap_pod_filter(ifname, Hook::IntoPod)?;
        self.swap_pod_filter(ifname, Hook::FromPod)
    }

    /// Replaces the filter of `hook` on a pod veth without a gap, between
    /// [`POD_FILTER_PRIORITIES`] (each direction has its own filter list).
    fn swap_pod_filter(&mut self, ifname: &str, hook: Hook) -> Result<(), Error> {
        let [a, b] = POD_FILTER_PRIORITIES;
        let stale = match self.attach_pod_at(ifname, hook, a)? {
            true => b,
            false => match self.attach_pod_at(ifname, hook, b)? {
                true => a,
                false => {
                    // Both taken: a predecessor died mid-swap. Replace b
                    // while a keeps steering, then drop a.
                    self.detach_pod_at(ifname, hook, b)?;
                    if !self.attach_pod_at(ifname, hook, b)? {
                        return Err(Error::Attach {
                            action: "attaching",
                            prog: hook.name(),
                            ifname: ifname.into(),
                            source: Box::new(ProgramError::IOError(
                                std::io::Error::from_raw_os_error(libc::EEXIST),
                            )),
                        });
                    }
                    a
                }
            },
        };
        self.detach_pod_at(ifname, hook, stale)?;
        Ok(())
    }

    /// Attaches `hook` at `priority`; `Ok(false)` if that slot is taken.
    fn attach_pod_at(&mut self, ifname: &str, hook: Hook, priority: u16) -> Result<bool, Error> {
        let prog = self.prog_mut(hook)?;
        let opts = TcAttachOptions::Netlink(NlOptions {
            priority,
            handle: POD_FILTER_HANDLE,
            classid: None,
        });
        match prog.attach_with_options(ifname, hook.pod_side(), opts) {
            Ok(id) => {
                let link = prog.take_link(id).map_err(|source| Error::Attach {
                    action: "taking the link of",
                    prog: hook.name(),
                    ifname: ifname.into(),
                    source: Box::new(source),
                })?;
                // Dropping the link would delete the filter; forgetting it
                // leaks nothing (a netlink link is only ifindex + prio +
                // handle, no fd) and keeps the filter past this process.
                std::mem::forget(link);
                Ok(true)
            }
            Err(e) if netlink_errno(&e) == Some(libc::EEXIST) => Ok(false),
            Err(source) => Err(Error::Attach {
                action: "attaching",
                prog: hook.name(),
                ifname: ifname.into(),
                source: Box::new(source),
            }),
        }
    }

    /// Deletes the filter of `hook` at `priority`, if any.
    fn detach_pod_at(&mut self, ifname: &str, hook: Hook, priority: u16) -> Result<(), Error> {
        let link = match tc::SchedClassifierLink::attached(
            ifname,
            hook.pod_side(),
            priority,
            POD_FILTER_HANDLE,
            None,
        ) {
            Ok(link) => link,
            // The veth is gone (the pod was deleted): so is the filter.
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(()),
            Err(source) => {
                return Err(Error::Interface {
                    ifname: ifname.into(),
                    source,
                })
            }
        };
        match link.detach() {
            Ok(()) => Ok(()),
            Err(e) if matches!(netlink_errno(&e), Some(libc::ENOENT) | Some(libc::ENODEV)) => {
                Ok(())
            }
            Err(source) => Err(Error::Attach {
                action: "detaching",
                prog: hook.name(),
                ifname: ifname.into(),
                source: Box::new(source),
            }),
        }
    }

    /// Removes `from_pod` and `into_pod` from a pod veth (both priorities).
    /// A missing interface or filter is not an error.
    pub fn detach_pod(&mut self, ifname: &str) -> Result<(), Error> {
        for hook in [Hook::FromPod, Hook::IntoPod] {
            for prio in POD_FILTER_PRIORITIES {
                self.detach_pod_at(ifname, hook, prio)?;
            }
        }
        Ok(())
    }

    /// Writes `veil_config`. A `tun_ifindex` of 0 means "the TUN `to_pod`
    /// is attached to" (see [`Self::attach_tun`]); with encryption enabled and
    /// no TUN at all, remote-pod traffic is dropped (fail closed).
    pub fn set_config(&mut self, cfg: DatapathConfig) -> Result<(), Error> {
        mss_for_mtu(cfg.tun_mtu)?;
        if self.tun_attached != 0 && cfg.tun_ifindex != 0 && cfg.tun_ifindex != self.tun_attached {
            return Err(Error::Config(format!(
                "tun_ifindex {} is not the TUN to_pod is attached to (ifindex {})",
                cfg.tun_ifindex, self.tun_attached
            )));
        }
        self.cfg = Some(cfg);
        self.write_config()
    }

    fn write_config(&mut self) -> Result<(), Error> {
        let raw = match self.cfg {
            Some(cfg) => {
                let (mss_v4, mss_v6) = mss_for_mtu(cfg.tun_mtu)?;
                let tun_ifindex = if cfg.tun_ifindex != 0 {
                    cfg.tun_ifindex
                } else {
                    self.tun_attached
                };
                if cfg.enabled && tun_ifindex == 0 {
                    tracing::warn!(
                        "encryption enabled without a TUN: remote-pod traffic is dropped"
                    );
                }
                ConfigRaw {
                    flags: if cfg.enabled { CFG_ENABLED } else { 0 }
                        | if cfg.strict { CFG_STRICT } else { 0 }
                        | if cfg.enabled && cfg.strict {
                            CFG_REFUSE_PLAINTEXT
                        } else {
                            0
                        },
                    tun_ifindex,
                    mss_v4,
                    mss_v6,
                    pad: 0,
                }
            }
            // Not configured yet: encryption off, but to_pod knows its TUN.
            None => ConfigRaw {
                tun_ifindex: self.tun_attached,
                ..ConfigRaw::default()
            },
        };
        self.config.set(0, raw, 0).map_err(|source| Error::Map {
            map: "veil_config",
            key: "0".into(),
            source: Box::new(source),
        })
    }

    /// Makes `veil_endpoints` equal to `want`, writing only what changed.
    /// The pod MAC learned by `from_pod` is kept while the ifindex is the same.
    pub fn sync_endpoints(&mut self, want: &BTreeMap<IpAddr, EndpointValue>) -> Result<(), Error> {
        for (ip, v) in want {
            check_identity(&key_str(ip), v.identity)?;
        }
        let d = diff(&self.cur_endpoints, want);
        for (ip, v) in d.upsert {
            let key = Addr16::from(ip);
            let mac = match self.endpoints.get(&key, 0) {
                Ok(old) if old.ifindex == v.ifindex => old.mac,
                _ => [0; 6],
            };
            let raw = EndpointRaw {
                identity: v.identity,
                ifindex: v.ifindex,
                mac,
                flags: 0,
                pad: 0,
            };
            self.endpoints
                .insert(key, raw, 0)
                .map_err(|source| map_err("veil_endpoints", &ip, source))?;
            self.cur_endpoints.insert(ip, v);
        }
        for ip in d.remove {
            remove_ok(self.endpoints.remove(&Addr16::from(ip)))
                .map_err(|source| map_err("veil_endpoints", &ip, source))?;
            self.cur_endpoints.remove(&ip);
        }
        Ok(())
    }

    /// Makes `veil_remote` equal to `want` (prefixes are normalised: host
    /// bits cleared), writing only what changed.
    pub fn sync_remote(&mut self, want: &BTreeMap<IpNet, RemoteValue>) -> Result<(), Error> {
        let want: BTreeMap<IpNet, RemoteValue> =
            want.iter().map(|(n, v)| (n.trunc(), *v)).collect();
        let d = diff(&self.cur_remote, &want);
        for (net, v) in d.upsert {
            let raw = RemoteRaw {
                flags: if v.has_peer { REMOTE_HAS_PEER } else { 0 }
                    | if v.local { REMOTE_LOCAL } else { 0 },
                node_id: v.node_id,
            };
            self.remote
                .insert(&prefix_key(net).into(), raw, 0)
                .map_err(|source| Error::Map {
                    map: "veil_remote",
                    key: net.to_string(),
                    source: Box::new(source),
                })?;
            self.cur_remote.insert(net, v);
        }
        for net in d.remove {
            remove_ok(self.remote.remove(&prefix_key(net).into())).map_err(|source| {
                Error::Map {
                    map: "veil_remote",
                    key: net.to_string(),
                    source: Box::new(source),
                }
            })?;
            self.cur_remote.remove(&net);
        }
        Ok(())
    }

    /// Makes `veil_ipcache` (remote pod IP -> identity) equal to `want`.
    pub fn sync_ipcache(&mut self, want: &BTreeMap<IpAddr, u32>) -> Result<(), Error> {
        for (ip, id) in want {
            check_identity(&key_str(ip), *id)?;
        }
        let d = diff(&self.cur_ipcache, want);
        for (ip, id) in d.upsert {
            self.ipcache
                .insert(Addr16::from(ip), id, 0)
                .map_err(|source| map_err("veil_ipcache", &ip, source))?;
            self.cur_ipcache.insert(ip, id);
        }
        for ip in d.remove {
            remove_ok(self.ipcache.remove(&Addr16::from(ip)))
                .map_err(|source| map_err("veil_ipcache", &ip, source))?;
            self.cur_ipcache.remove(&ip);
        }
        Ok(())
    }

    /// Makes the policy maps (`veil_policy`, `veil_cidr`) equal to
    /// `compiled`, writing only the entries that changed; returns how many
    /// map operations that took.
    ///
    /// Order matters for a flow that is allowed before and after: new and
    /// changed entries are written before stale ones are deleted, and the
    /// LPM trie's longest match means a half-applied update can only fall
    /// back to a shorter (covering) entry of the old or new set.
    pub fn sync_policy(&mut self, compiled: &Compiled) -> Result<usize, Error> {
        let mut ops = 0;
        for (net, id) in &compiled.cidrs {
            check_identity(&net.to_string(), id.0)?;
        }
        let cidrs: BTreeMap<IpNet, Identity> = compiled
            .cidrs
            .iter()
            .map(|(n, i)| (n.trunc(), *i))
            .collect();
        let d = diff(&self.cur_cidr, &cidrs);
        let cidr_err = |net: &IpNet, source: MapError| Error::Map {
            map: "veil_cidr",
            key: net.to_string(),
            source: Box::new(source),
        };
        for (net, id) in d.upsert {
            self.cidr
                .insert(&prefix_key(net).into(), id.0, 0)
                .map_err(|e| cidr_err(&net, e))?;
            self.cur_cidr.insert(net, id);
            ops += 1;
        }
        let d_policy = diff(&self.cur_policy, &compiled.entries);
        let policy_err = |k: &EntryKey, source: MapError| Error::Map {
            map: "veil_policy",
            key: format!("{k:?}"),
            source: Box::new(source),
        };
        for (k, v) in d_policy.upsert {
            check_identity("policy subject", k.subject.0)?;
            check_identity("policy peer", k.peer)?;
            let raw = PolicyValueRaw {
                verdict: v.verdict as u8,
                pad: [0; 3],
                rule: v.rule.0,
            };
            self.policy
                .insert(&policy_key(&k), raw, 0)
                .map_err(|e| policy_err(&k, e))?;
            self.cur_policy.insert(k, v);
            ops += 1;
        }
        for k in d_policy.remove {
            remove_ok(self.policy.remove(&policy_key(&k))).map_err(|e| policy_err(&k, e))?;
            self.cur_policy.remove(&k);
            ops += 1;
        }
        for net in d.remove {
            remove_ok(self.cidr.remove(&prefix_key(net).into())).map_err(|e| cidr_err(&net, e))?;
            self.cur_cidr.remove(&net);
            ops += 1;
        }
        Ok(ops)
    }

    /// Number of entries in `veil_policy` (as written by this process).
    pub fn policy_entries(&self) -> usize {
        self.cur_policy.len()
    }

    /// Policy drops: packets per (source identity, destination identity,
    /// direction of the failed check, reason).
    pub fn policy_drops(&self) -> Result<BTreeMap<PolicyDrop, u64>, Error> {
        let mut out = BTreeMap::new();
        for item in self.policy_drops.iter() {
            let (k, n) = item.map_err(|source| Error::Map {
                map: "veil_policy_drops",
                key: "<iteration>".into(),
                source: Box::new(source),
            })?;
            let reason = Reason::ALL
                .into_iter()
                .find(|r| r.is_drop() && r.slot() == k.reason);
            let dir = if k.dir == 1 {
                crate::policy::Direction::Egress
            } else {
                crate::policy::Direction::Ingress
            };
            if let Some(reason) = reason {
                *out.entry((k.src, k.dst, dir, reason)).or_insert(0) += n;
            }
        }
        Ok(out)
    }

    /// Packets that passed identity policy, per direction enforced, summed
    /// over CPUs (a packet judged for both ends counts once in each).
    pub fn policy_allowed(&self) -> Result<PolicyAllowed, Error> {
        let mut out = BTreeMap::new();
        for dir in crate::policy::Direction::BOTH {
            // DIR_INGRESS 0, DIR_EGRESS 1 (bpf/lib/policy.h).
            let slot = dir as u32;
            let per_cpu = self
                .policy_allowed
                .get(&slot, 0)
                .map_err(|source| Error::Map {
                    map: "veil_policy_allowed",
                    key: dir.to_string(),
                    source: Box::new(source),
                })?;
            let sum = per_cpu.iter().fold(0u64, |a, n| a.wrapping_add(*n));
            out.insert(dir, sum);
        }
        Ok(out)
    }

    /// Packets and bytes per reason, summed over CPUs.
    pub fn metrics(&self) -> Result<BTreeMap<Reason, (u64, u64)>, Error> {
        let mut out = BTreeMap::new();
        for r in Reason::ALL {
            let per_cpu = self
                .metrics
                .get(&r.slot(), 0)
                .map_err(|source| Error::Map {
                    map: "veil_metrics",
                    key: r.to_string(),
                    source: Box::new(source),
                })?;
            let sum = per_cpu.iter().fold((0u64, 0u64), |(p, b), v| {
                (p.wrapping_add(v.packets), b.wrapping_add(v.bytes))
            });
            out.insert(r, sum);
        }
        Ok(out)
    }
}

fn check_identity(key: &str, identity: u32) -> Result<(), Error> {
    if identity > IDENTITY_MAX {
        return Err(Error::IdentityTooLarge {
            key: key.into(),
            identity,
        });
    }
    Ok(())
}

fn map_err(map: &'static str, ip: &IpAddr, source: MapError) -> Error {
    Error::Map {
        map,
        key: key_str(ip),
        source: Box::new(source),
    }
}

/// Deleting an absent key is success: the goal state is reached.
fn remove_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod btf_tests {
    use super::*;

    /// The memory saving in `Datapath::load` rests on this: with a CO-RE
    /// relocation in the object, the kernel's BTF is kept (and parsed) again.
    #[test]
    fn the_datapath_object_needs_no_kernel_btf() {
        assert!(!needs_kernel_btf(OBJECT).expect("the built object parses"));
    }

    #[test]
    fn a_broken_object_is_an_error_not_a_guess() {
        let err = needs_kernel_btf(b"not an ELF file").unwrap_err();
        assert!(matches!(err, Error::Load(_)), "{err}");
    }
}
