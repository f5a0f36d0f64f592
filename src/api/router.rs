//! Matching a request's surface, method and path against the route table (declared in
//! `api::ROUTES`). It owns the pattern syntax, the optional `/api/v1` prefix, and what 404 and
//! 405 (with its `Allow` list) mean; it knows nothing of handlers beyond carrying their tag.

use http::Method;

use super::Surface;

/// The prefix the public API is versioned under; the seed's unprefixed paths stay routed.
pub const VERSION_PREFIX: &str = "/api/v1";

/// The surfaces a route is served on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Surfaces(u8);

impl Surfaces {
    pub const PUBLIC: Surfaces = Surfaces(1);
    pub const INTERNAL: Surfaces = Surfaces(2);
    pub const ADMIN: Surfaces = Surfaces(4);
    /// The cart API: clients, and other regions' edges forwarding for them.
    pub const CART: Surfaces = Surfaces(1 | 2);
    pub const ALL: Surfaces = Surfaces(1 | 2 | 4);

    fn bit(surface: Surface) -> u8 {
        match surface {
            Surface::Public => Surfaces::PUBLIC.0,
            Surface::Internal => Surfaces::INTERNAL.0,
            Surface::Admin => Surfaces::ADMIN.0,
        }
    }

    pub fn contains(self, surface: Surface) -> bool {
        self.0 & Surfaces::bit(surface) != 0
    }
}

/// One row of the table: on these surfaces, `method` on a path matching `pattern` is served by
/// `handler`. A pattern is literal segments and at most one `{name}` segment, which matches one
/// non-empty segment. `name` labels the pattern for metrics and benchmarks.
#[derive(Debug)]
pub struct Route<H> {
    pub surfaces: Surfaces,
    pub method: Method,
    pub pattern: &'static str,
    pub name: &'static str,
    pub handler: H,
    /// Whether the path may also carry [`VERSION_PREFIX`] (every client-facing route does; the
    /// edge-to-edge `/internal/` ones do not).
    pub versioned: bool,
}

/// What the table says about a request.
#[derive(Debug)]
pub enum Lookup<'t, 'p, H> {
    /// Served by this route; the `{…}` segment's raw (still percent-encoded) text, if any.
    Found(&'t Route<H>, Option<&'p str>),
    /// The path is routed on this surface, but not for this method: the methods that are.
    MethodNotAllowed(String),
    NotFound,
}

/// Matches `path` against `pattern`; `Some(capture)` on a match.
fn matches<'p>(pattern: &str, path: &'p str) -> Option<Option<&'p str>> {
    let mut capture = None;
    let mut want = pattern.strip_prefix('/')?.split('/');
    let mut have = path.strip_prefix('/')?.split('/');
    loop {
        match (want.next(), have.next()) {
            (None, None) => return Some(capture),
            (Some(w), Some(h)) if w.starts_with('{') => {
                if h.is_empty() {
                    return None;
                }
                capture = Some(h);
            }
            (Some(w), Some(h)) if w == h => {}
            _ => return None,
        }
    }
}

/// The path a versioned route sees: without [`VERSION_PREFIX`] when it carries one.
fn unversioned(path: &str) -> &str {
    match path.strip_prefix(VERSION_PREFIX) {
        Some(rest) if rest.starts_with('/') => rest,
        _ => path,
    }
}

fn path_matches<'p, H>(route: &Route<H>, path: &'p str) -> Option<Option<&'p str>> {
    let path = if route.versioned {
        unversioned(path)
    } else {
        path
    };
    matches(route.pattern, path)
}

/// Looks a request up: the route that serves it, else 405 with the methods that would, else 404.
pub fn lookup<'t, 'p, H>(
    table: &'t [Route<H>],
    surface: Surface,
    method: &Method,
    path: &'p str,
) -> Lookup<'t, 'p, H> {
    let mut allow: Vec<&str> = Vec::new();
    for route in table.iter().filter(|r| r.surfaces.contains(surface)) {
        let Some(capture) = path_matches(route, path) else {
            continue;
        };
        // HEAD is GET without the body (RFC 9110 §9.3.2): every GET route answers it.
        if route.method == method || (method == Method::HEAD && route.method == Method::GET) {
            return Lookup::Found(route, capture);
        }
        if !allow.contains(&route.method.as_str()) {
            allow.push(route.method.as_str());
            if route.method == Method::GET && !allow.contains(&"HEAD") {
                allow.push(Method::HEAD.as_str());
            }
        }
    }
    if allow.is_empty() {
        Lookup::NotFound
    } else {
        Lookup::MethodNotAllowed(allow.join(", "))
    }
}

/// The name of the client- or operator-facing route a path matches, whatever the method.
pub fn name<H>(table: &[Route<H>], path: &str) -> Option<&'static str> {
    table
        .iter()
        .filter(|r| r.surfaces.contains(Surface::Public) || r.surfaces.contains(Surface::Admin))
        .find(|r| path_matches(r, path).is_some())
        .map(|r| r.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parameter_matches_one_non_empty_segment() {
        assert_eq!(matches("/cart", "/cart"), Some(None));
        assert_eq!(matches("/cart", "/cart/"), None);
        assert_eq!(
            matches("/cart/items/{id}", "/cart/items/a"),
            Some(Some("a"))
        );
        assert_eq!(matches("/cart/items/{id}", "/cart/items/"), None);
        assert_eq!(matches("/cart/items/{id}", "/cart/items/a/b"), None);
        assert_eq!(matches("/o/{id}/confirm", "/o//confirm"), None);
        assert_eq!(matches("/o/{id}/confirm", "/o/x/confirm"), Some(Some("x")));
    }

    #[test]
    fn the_version_prefix_is_a_whole_segment() {
        assert_eq!(unversioned("/api/v1/cart"), "/cart");
        assert_eq!(unversioned("/api/v1cart"), "/api/v1cart");
        assert_eq!(unversioned("/api/v1"), "/api/v1");
    }
}
