//! The public entry points, where a load starts and what it hands back: the [`Loader`]
//! (`loader`: host loads, the report), loads into GPU memory (`device`) and placed loads
//! across several destinations (`placed`), in-place updates of tensors the caller holds
//! (`update`). Each checks what the caller asked for, then hands
//! the work to [`crate::plan`] and [`crate::engine`]; the crate root re-exports their types.
//!
//! [`Loader`]: crate::Loader

pub(crate) mod device;
pub(crate) mod loader;
pub(crate) mod placed;
pub(crate) mod update;
