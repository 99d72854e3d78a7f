//! actix-web under Ally: an `HttpServer` that loses no request on a reload.
//!
//! ```no_run
//! use actix_web::{App, HttpServer, web};
//! use ally_client::actix::{CloseWhileStopping, serve};
//!
//! #[actix_web::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let ally = ally_client::Ally::from_env().await?;
//!     let listener: std::net::TcpListener = ally.listen("127.0.0.1:8080").await?;
//!     let drain = ally.drain();
//!     let close = CloseWhileStopping::new(&drain);
//!     let server = HttpServer::new(move || {
//!         App::new()
//!             .wrap(close.clone())
//!             .route("/", web::get().to(|| async { "hello\n" }))
//!     });
//!     ally.ready().await?;
//!     serve(server, listener, drain).await?;
//!     Ok(())
//! }
//! ```
//!
//! Two pieces, both needed: the [`CloseWhileStopping`] middleware on the `App`, and
//! [`serve`] to run the server (it takes the `HttpServer` as configured — workers,
//! `keep_alive`, ... — and adds Ally's listener and stop). What they do, and why:
//!
//! 1. **Ally's stop, not actix's signals.** actix-web installs its own `SIGTERM`
//!    (graceful) and `SIGINT`/`SIGQUIT` (forced) handlers, which start the shutdown below
//!    all at once the moment the broker's stop signal arrives. [`serve`] calls
//!    `disable_signals()` and follows the [`Drain`] instead.
//! 2. **Stop accepting at once** (`ServerHandle::pause`): actix's accept thread takes the
//!    listener out of its poll set; this process's duplicate of the socket stays open
//!    but unused, and the next generation accepts everything queued on the shared
//!    socket. Not `stop(true)` yet: its first step wakes every connection's
//!    graceful-shutdown signal, and actix then closes each connection that is between
//!    requests — an idle keep-alive connection on which the client may be sending its
//!    next request that very moment, or one accepted a moment ago whose first request
//!    has not arrived (it also drops connections the accept thread has handed to a
//!    worker that has not picked them up yet). A client that does not retry reports
//!    each as a failed request.
//! 3. **`Connection: close` while stopping** ([`CloseWhileStopping`]): every response
//!    sent after the stop closes its connection, so a client that keeps sending moves to
//!    a new connection, which the next generation accepts. actix writes `Connection:
//!    close` to HTTP/1.1 clients; to an HTTP/1.0 client (`ab -k`) it writes no
//!    `Connection` header at all, which in HTTP/1.0 means the same (no `keep-alive`),
//!    and closes the connection after the response.
//! 4. **Close idle connections only after [`Drain::idle`]**: [`serve`] calls actix's
//!    graceful `ServerHandle::stop(true)` that long after the stop. By then every
//!    connection that sent a request since the stop has been answered with `close` and
//!    is gone, so the connections left have been idle for the whole idle time (and are
//!    closed now, the inherent HTTP/1.1 race being as unlikely as it gets) or are in the
//!    middle of a request, which actix lets finish and answers with `close`.
//! 5. **End when every connection is done.** actix's workers wait for their last
//!    connections up to the server's `shutdown_timeout` (default 30 s: set it below the
//!    app's `stop_timeout` minus the drain idle time, so a slow request ends before the
//!    broker's `SIGKILL` does); then the future [`serve`] returned resolves.
//!
//! actix's own timeouts stay as configured, because none of them is the drain's:
//! `keep_alive` (default 5 s) closes a connection idle that long after its last
//! response, stop or no stop — the keep-alive race every server has, not one a reload
//! adds; `client_request_timeout` (default 5 s) bounds the wait for a request's head as
//! always (a connection accepted just before the stop has until step 4 at most);
//! `shutdown_timeout` is step 5.
//!
//! Each step matters. 20 reloads of the `actix_server` example under load generators
//! that do not retry (8 connections; `client/tests/reload_actix.rs`) failed, under `ab`
//! (a new connection per request), `ab -k` and `wrk`: 168, 42 and 160 requests with
//! actix's own signal handling; 177, 67 and 151 with the middleware but `stop(true)` at
//! the stop; 0, 18 and 40 with [`serve`] but without the middleware; 0, 0 and 0 with
//! both.
//!
//! [`serve`] serves HTTP/1 (actix's `listen`). HTTP/2 (actix-web's `http2` feature) is
//! not drained by actix-web 4.18: it sends an HTTP/2 connection no `GOAWAY` on a
//! graceful stop, so the connection stays open until `shutdown_timeout` and is then
//! dropped; serve HTTP/2 with `ally_client::hyper` instead.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;

use actix_http::{Request, Response};
use actix_service::IntoServiceFactory;
use actix_web::body::MessageBody;
use actix_web::dev::{
    AppConfig, ResponseHead, Service, ServiceFactory, ServiceRequest, ServiceResponse, Transform,
};
use actix_web::error::InternalError;
use actix_web::http::{ConnectionType, StatusCode};
use actix_web::{Error, HttpServer};

use crate::drain::Drain;

/// Runs `server` on `listener` (a socket from [`Ally::listen`](crate::Ally::listen))
/// until `drain`'s stop, then drains it as the [module docs](self) say, and returns
/// once every connection is done.
///
/// The server's signal handling is turned off: the stop comes from `drain`. Install
/// [`CloseWhileStopping`] on the `App` too, or keep-alive clients keep their
/// connections until the idle time is up and then race its close.
pub async fn serve<F, I, S, B>(
    server: HttpServer<F, I, S, B>,
    listener: std::net::TcpListener,
    drain: Drain,
) -> io::Result<()>
where
    F: Fn() -> I + Send + Clone + 'static,
    I: IntoServiceFactory<S, Request>,
    S: ServiceFactory<Request, Config = AppConfig> + 'static,
    S::Error: Into<Error> + 'static,
    S::InitError: std::fmt::Debug,
    S::Response: Into<Response<B>> + 'static,
    <S::Service as Service<Request>>::Future: 'static,
    S::Service: 'static,
    B: MessageBody + 'static,
{
    let server = server.disable_signals().listen(listener)?.run();
    let handle = server.handle();
    let drive = async move {
        drain.stopped().await;
        handle.pause().await;
        tokio::time::sleep(drain.idle()).await;
        handle.stop(true).await;
    };
    tokio::pin!(server, drive);
    let mut driving = true;
    loop {
        tokio::select! {
            result = &mut server => return result,
            () = &mut drive, if driving => driving = false,
        }
    }
}

/// actix-web middleware: while stopping, every response closes its connection. See
/// the [module docs](self); wrap it outermost (last) so that no other middleware's
/// response escapes it.
#[derive(Debug, Clone)]
pub struct CloseWhileStopping {
    drain: Drain,
}

impl CloseWhileStopping {
    /// Closes connections once `drain`'s stop has been requested.
    pub fn new(drain: &Drain) -> CloseWhileStopping {
        CloseWhileStopping {
            drain: drain.clone(),
        }
    }
}

impl<S, B> Transform<S, ServiceRequest> for CloseWhileStopping
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<B>;
    type Error = Error;
    type Transform = CloseWhileStoppingService<S>;
    type InitError = ();
    type Future = std::future::Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        std::future::ready(Ok(CloseWhileStoppingService {
            service: Rc::new(service),
            drain: self.drain.clone(),
        }))
    }
}

/// The service [`CloseWhileStopping`] wraps around an `App`'s.
pub struct CloseWhileStoppingService<S> {
    service: Rc<S>,
    drain: Drain,
}

impl<S> std::fmt::Debug for CloseWhileStoppingService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloseWhileStoppingService")
            .field("drain", &self.drain)
            .finish_non_exhaustive()
    }
}

impl<S, B> Service<ServiceRequest> for CloseWhileStoppingService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<B>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<ServiceResponse<B>, Error>>>>;

    actix_web::dev::forward_ready!(service);

    fn call(&self, request: ServiceRequest) -> Self::Future {
        let service = Rc::clone(&self.service);
        let drain = self.drain.clone();
        Box::pin(async move {
            match service.call(request).await {
                Ok(mut response) => {
                    if drain.is_stopping() {
                        close(response.response_mut().head_mut());
                    }
                    Ok(response)
                }
                // An error that escaped the `App`'s own handling (from another middleware):
                // actix renders it later, from the response it carries.
                Err(error) if drain.is_stopping() => {
                    let mut response = error.error_response();
                    close(response.head_mut());
                    Err(InternalError::from_response(error, response).into())
                }
                Err(error) => Err(error),
            }
        })
    }
}

fn close(head: &mut ResponseHead) {
    // An upgraded connection (WebSocket) is the handler's to close.
    if head.status != StatusCode::SWITCHING_PROTOCOLS {
        head.set_connection_type(ConnectionType::Close);
    }
}

#[cfg(test)]
mod tests {
    use actix_web::body::BoxBody;
    use actix_web::dev::ServiceResponse;
    use actix_web::middleware::{Next, from_fn};
    use actix_web::{App, HttpResponse, test, web};

    use super::*;
    use crate::StopHandle;

    fn connection(response: &ServiceResponse) -> ConnectionType {
        response.response().head().connection_type()
    }

    #[actix_web::test]
    async fn closes_only_while_stopping() {
        let stop = StopHandle::new();
        let drain = Drain::new(stop.clone());
        let app = test::init_service(
            App::new()
                .wrap(CloseWhileStopping::new(&drain))
                .route("/", web::get().to(|| async { "hello" }))
                .route(
                    "/ws",
                    web::get().to(|| async {
                        HttpResponse::SwitchingProtocols()
                            .upgrade("websocket")
                            .finish()
                    }),
                ),
        )
        .await;
        let get = |path| test::TestRequest::get().uri(path).to_request();

        let response = test::call_service(&app, get("/")).await;
        assert_eq!(connection(&response), ConnectionType::KeepAlive);

        stop.stop();
        let response = test::call_service(&app, get("/")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(connection(&response), ConnectionType::Close);
        // A missing route is a response too.
        let response = test::call_service(&app, get("/nope")).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(connection(&response), ConnectionType::Close);
        // An upgrade is left alone.
        let response = test::call_service(&app, get("/ws")).await;
        assert_eq!(connection(&response), ConnectionType::Upgrade);
    }

    #[actix_web::test]
    async fn an_error_from_an_inner_middleware_closes_too() {
        async fn refuse(
            _: ServiceRequest,
            _: Next<BoxBody>,
        ) -> Result<ServiceResponse<BoxBody>, Error> {
            Err(actix_web::error::ErrorForbidden("no"))
        }
        let stop = StopHandle::new();
        let drain = Drain::new(stop.clone());
        let app = test::init_service(
            App::new()
                .wrap(from_fn(refuse))
                .wrap(CloseWhileStopping::new(&drain))
                .route("/", web::get().to(|| async { "hello" })),
        )
        .await;
        let get = || test::TestRequest::get().uri("/").to_request();

        let error = test::try_call_service(&app, get()).await.err().unwrap();
        assert_eq!(
            error.error_response().head().connection_type(),
            ConnectionType::KeepAlive
        );

        stop.stop();
        let error = test::try_call_service(&app, get()).await.err().unwrap();
        let response = error.error_response();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(response.head().connection_type(), ConnectionType::Close);
    }
}
