//! medmesh addition (see `PATCH.md`): a switch back to the kernels burn-flex 0.22.1 and
//! burn-backend 0.22.1 ship for what medmesh replaced (2D/3D convolutions forward and backward,
//! batch normalization in training), so that one benchmark run can measure before and after.

use core::sync::atomic::{AtomicBool, Ordering};

static STOCK: AtomicBool = AtomicBool::new(false);

/// `true`: burn-flex 0.22.1's own kernels; `false` (the default): medmesh's.
pub fn use_stock_kernels(stock: bool) {
    STOCK.store(stock, Ordering::Relaxed);
}

pub(crate) fn stock() -> bool {
    STOCK.load(Ordering::Relaxed)
}
