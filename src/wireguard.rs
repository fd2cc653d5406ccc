//! wireguard (in progress)
