//! What every sollol HTTP server shares, so the gateway and the engine's port defend the same way:
//! `boundary`, the browser boundary (Origin allow-list, Host check against DNS rebinding, CORS answers)
//! as an axum layer over [`sollol_policy::browser`]; and `serve`, an HTTP/1 accept loop with a
//! connection cap, a per-address cap and a header timer; `openai`, OpenAI's error shape on the
//! OpenAI-compatible routes.

pub mod boundary;
pub mod openai;
pub mod serve;

pub use boundary::guard;
pub use serve::{AddressCounts, Counted, Limits, raise_open_files_limit, serve};
