//! The tc redirect between the pod's CNI interface (a veth) and the VM's tap, inside the pod netns
//! (Kata's "tcfilter" model): an ingress qdisc on each, with a match-all u32 filter whose action is a
//! mirred egress redirect to the other, i.e.
//! `tc filter add dev A parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev B`.

use futures_util::TryStreamExt;
use nix::errno::Errno;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::tc::{TcHandle, TcMessage};
use rtnetlink::{Handle, LinkUnspec};

use super::NetworkError;

/// ETH_P_ALL in network byte order, as tc's `protocol all`.
const PROTOCOL_ALL: u16 = 0x0003u16.to_be();
/// The ingress qdisc's handle, `ffff:`; its filters' parent.
const INGRESS_PARENT: u32 = 0xffff_0000;

/// An interface as netlink reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index.
    pub index: u32,
    /// MAC address (zero if it has none).
    pub mac: [u8; 6],
    /// MTU.
    pub mtu: u32,
}

fn netlink(what: impl std::fmt::Display) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    move |source| NetworkError::Netlink {
        what: what.to_string(),
        source,
    }
}

fn errno(e: &rtnetlink::Error) -> Option<Errno> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| Errno::from_raw(-c.get())),
        _ => None,
    }
}

/// The interface `name`, or None if there is none.
pub async fn find_link(handle: &Handle, name: &str) -> Result<Option<LinkInfo>, NetworkError> {
    let mut links = handle.link().get().match_name(name).execute();
    let link = match links.try_next().await {
        Ok(link) => link,
        Err(e) if errno(&e) == Some(Errno::ENODEV) => None,
        Err(e) => return Err(netlink(format_args!("finding interface {name}"))(e)),
    };
    Ok(link.map(|link| {
        let mut info = LinkInfo {
            index: link.header.index,
            mac: [0; 6],
            mtu: 0,
        };
        for attribute in &link.attributes {
            match attribute {
                LinkAttribute::Address(a) if a.len() == 6 => info.mac.copy_from_slice(a),
                LinkAttribute::Mtu(mtu) => info.mtu = *mtu,
                _ => {}
            }
        }
        info
    }))
}

/// The interface `name`; an error naming it if there is none.
pub async fn link(handle: &Handle, name: &str) -> Result<LinkInfo, NetworkError> {
    find_link(handle, name)
        .await?
        .ok_or_else(|| NetworkError::NoInterface(name.into()))
}

/// Deletes the ingress qdisc of interface `index` (and with it its filters); none is fine.
async fn del_ingress(handle: &Handle, index: u32, name: &str) -> Result<(), NetworkError> {
    let mut request = handle.qdisc().del(index as i32);
    let message: &mut TcMessage = request.message_mut();
    message.header.parent = TcHandle::INGRESS;
    message.header.handle = INGRESS_PARENT.into();
    match request.execute().await {
        // EINVAL/ENOENT: there is no ingress qdisc; ENODEV: no interface.
        Err(e)
            if matches!(
                errno(&e),
                Some(Errno::EINVAL | Errno::ENOENT | Errno::ENODEV)
            ) =>
        {
            Ok(())
        }
        result => result.map_err(netlink(format_args!(
            "deleting the ingress qdisc of {name}"
        ))),
    }
}

/// Redirects everything `from` receives to egress of `to`.
async fn add_redirect(
    handle: &Handle,
    from: (u32, &str),
    to: (u32, &str),
) -> Result<(), NetworkError> {
    let what = |step: &str| format!("{step} of {}", from.1);
    handle
        .qdisc()
        .add(from.0 as i32)
        .ingress()
        .execute()
        .await
        .map_err(netlink(what("adding the ingress qdisc")))?;
    handle
        .traffic_filter(from.0 as i32)
        .add()
        .parent(INGRESS_PARENT)
        .protocol(PROTOCOL_ALL)
        .redirect(to.0)
        .map_err(netlink(what("building the redirect filter")))?
        .execute()
        .await
        .map_err(netlink(format_args!(
            "adding the redirect {} -> {}",
            from.1, to.1
        )))
}

/// Redirects all traffic between `veth` and `tap` both ways, replacing earlier ingress qdiscs (and
/// their filters) of both, and sets the tap up with the veth's MTU; returns the veth's link
/// information.
pub async fn connect(handle: &Handle, veth: &str, tap: &str) -> Result<LinkInfo, NetworkError> {
    let veth_link = link(handle, veth).await?;
    let tap_link = link(handle, tap).await?;
    del_ingress(handle, veth_link.index, veth).await?;
    del_ingress(handle, tap_link.index, tap).await?;
    add_redirect(handle, (veth_link.index, veth), (tap_link.index, tap)).await?;
    add_redirect(handle, (tap_link.index, tap), (veth_link.index, veth)).await?;
    // The tap carries the veth's frames: same MTU, and up (a down tap drops what is redirected to it).
    let up = LinkUnspec::new_with_index(tap_link.index)
        .mtu(veth_link.mtu)
        .up()
        .build();
    handle
        .link()
        .set(up)
        .execute()
        .await
        .map_err(netlink(format_args!("setting {tap} up")))?;
    Ok(veth_link)
}
