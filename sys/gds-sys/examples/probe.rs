//! Opens the cuFile driver and prints what it reports: nvidia-fs version, supported file
//! systems, and whether compatibility mode is allowed.
//!
//!     cargo run -p gds-sys --example probe

fn main() {
    let cufile = match gds_sys::CuFile::load() {
        Ok(c) => c,
        Err(e) => {
            println!("unavailable: {e}");
            return;
        }
    };
    // SAFETY: entry points resolved from libcufile with their header signatures.
    let open = gds_sys::decode_status(unsafe { (cufile.driver_open)() });
    println!("cuFileDriverOpen: {open:?}");
    let mut props = gds_sys::CUfileDrvProps_t::default();
    // SAFETY: props is a valid out pointer of the right layout.
    let got = gds_sys::decode_status(unsafe { (cufile.driver_get_properties)(&mut props) });
    println!("cuFileDriverGetProperties: {got:?}");
    println!(
        "nvidia-fs {}.{}, dstatusflags {:#x}, dcontrolflags {:#x} (compat mode allowed: {}), max_direct_io_size {}",
        props.nvfs.major_version,
        props.nvfs.minor_version,
        props.nvfs.dstatusflags,
        props.nvfs.dcontrolflags,
        props.nvfs.dcontrolflags & (1 << gds_sys::CU_FILE_ALLOW_COMPAT_MODE) != 0,
        props.nvfs.max_direct_io_size
    );
    // SAFETY: the driver was opened above (or the call reports that it was not).
    println!("cuFileDriverClose: {:?}", gds_sys::decode_status(unsafe { (cufile.driver_close)() }));
}
