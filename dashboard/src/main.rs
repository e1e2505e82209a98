//! Mounts the dashboard app on the page.

fn main() {
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(sollol_dashboard::App);
}
