//! The sign-in form shown when the gateway needs an API key and this browser holds no session. The
//! key is sent once; the gateway answers with an `HttpOnly` session cookie, and the page reloads.

use leptos::prelude::*;

use crate::store::sign_in;

#[component]
pub(crate) fn SignInForm() -> impl IntoView {
    let key = RwSignal::new(String::new());
    let error = RwSignal::new(None::<String>);
    let busy = RwSignal::new(false);
    let submit = move |event: leptos::ev::SubmitEvent| {
        event.prevent_default();
        let typed = key.get_untracked();
        if typed.trim().is_empty() {
            error.set(Some("Enter an API key.".to_owned()));
            return;
        }
        busy.set(true);
        leptos::task::spawn_local(async move {
            match sign_in(typed.trim()).await {
                Ok(()) => {
                    if let Some(window) = web_sys::window() {
                        let _ = window.location().reload();
                    }
                }
                Err(message) => {
                    busy.set(false);
                    error.set(Some(message));
                }
            }
        });
    };
    view! {
        <section id="sign-in" class="panel">
            <h2>"Sign in"</h2>
            <p>
                "This gateway needs an API key (" <code>"coordinator.api_keys"</code> " or "
                <code>"coordinator.admin_keys"</code> "). It is sent once; the browser then keeps a "
                "session cookie for this page only, not the key."
            </p>
            <form on:submit=submit>
                <label for="api-key">"API key"</label>
                <input
                    id="api-key"
                    type="password"
                    autocomplete="current-password"
                    prop:value=move || key.get()
                    on:input=move |event| key.set(event_target_value(&event))
                />
                <button type="submit" id="sign-in-button" prop:disabled=move || busy.get()>
                    "Sign in"
                </button>
            </form>
            {move || error.get().map(|message| view! {
                <p id="sign-in-error" class="banner error" role="alert">{message}</p>
            })}
        </section>
    }
}
