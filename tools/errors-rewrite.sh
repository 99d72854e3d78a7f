#!/bin/sh
# Rewrites broker-side Rust files from the old error enums (`broker::Error`,
# `dbus::errors::AllyError`, `net::AddressError`) to the one `ally_core::Error`:
#
#   tools/errors-rewrite.sh FILE...
#
# Idempotent (a rewritten file is left as it is) and mechanical: it changes
# constructor calls, names and imports only. Run `cargo fmt --all` afterwards
# (the new names differ in length). What it cannot rewrite — a *pattern* on an
# old variant such as `Err(Error::Failed(m)) =>` — is left for the compiler to
# point at; match on `e.kind()` there instead.
set -eu
[ "$#" -gt 0 ] || { echo "usage: $0 FILE..." >&2; exit 2; }
for file in "$@"; do
  perl -0777 -pi -e '
    my %snake = (
      InvalidArgument => "invalid_argument", AddressInUse => "address_in_use",
      AccessDenied => "access_denied", ReloadFailed => "reload_failed",
      Failed => "failed", NotOwner => "not_owner", Timeout => "timeout",
      LimitExceeded => "limit_exceeded",
    );
    my $kinds = join "|", keys %snake;

    # The broker'"'"'s own kind enum and its From<AddressError> become ally_core::Error.
    s~(?:///[^\n]*\n)*\#\[derive\([^)]*\)\]\npub enum Error \{\n(?=\s*\#\[error\("\{0\}"\)\]\n\s*InvalidArgument\(String\)).*?\n\}\n~/// What went wrong: the kind a D-Bus caller sees, the message and the cause.\npub use ally_core::Error;\n~s;
    s~\n*impl From<AddressError> for Error \{\n.*?\n\}\n~\n~s;

    # AddressError is gone: addresses fail with ally_core::Error itself.
    s~^use ally_core::net::AddressError;\n~~mg;
    s~(use ally_core::net::\{[^}]*?)\bAddressError,\s*~$1~g;
    s~(use ally_core::net::\{[^}]*?),\s*AddressError\b~$1~g;
    s~(bind_as::Error::Address\((\w+)\) => )Error::from\(\2\)~$1$2~g;
    s~(Err\(bind_as::Error::Address\((\w+)\)\) => )Err\(Error::from\(\2\)\)~$1Err($2)~g;
    s~let (\w+) = (if\b.*?\n(\s*)\});\n\3\1\.map_err\(\|(\w+)\| AllyError::from\(crate::broker::Error::from\(\4\)\)\)~$2~gs;
    s~(\w+)\.map_err\(\|(\w+)\| AllyError::from\(crate::broker::Error::from\(\2\)\)\)~$1~g;

    # Broker calls already fail with the D-Bus error: Ok(x?) is x.
    s~\bOk\((self\.broker\.(?:close|ready|reload)\([^()]*\)(?:\.await)?)\?\)~$1~g;

    # `use AllyError::AccessDenied;` imported a variant as a function.
    if (s~^use AllyError::AccessDenied;\n\n?~~m) {
      s~(?<![\w:])AccessDenied\(~Error::access_denied(~g;
    }

    # Flattened causes become sources: Failed(format!("...: {e}")) keeps e.
    s~\b(?:AllyError|(?<![\w:])Error)::(?:Failed|failed)\(\s*format!\(\s*("(?:[^"\\]|\\.)*?): \{(\w+)\}"\s*,?\s*\)\s*,?\s*\)~Error::caused_by(ally_core::ErrorKind::Failed, format_args!($1"), $2)~g;
    s~\b(?:AllyError|(?<![\w:])Error)::(?:Failed|failed)\((\w+)\.to_string\(\)\)~Error::from_source(ally_core::ErrorKind::Failed, $1)~g;

    # Variant constructors become constructor functions.
    s~\bAllyError::($kinds)\(~Error::$snake{$1}(~g;
    s~(?<![\w:])((?:crate::)?(?:broker::)?)Error::($kinds)\(~$1Error::$snake{$2}(~g;

    # The client kept its own StateError-to-kind table; one From does it now.
    s~(fn local\(e: StateError\) -> Error \{\n).*?\n\}\n~$1    ally_core::Error::from(e).into()\n}\n~s;

    # AllyError is now ally_core::Error, re-exported by dbus::errors.
    s~\bAllyError\b~Error~g;
  ' "$file"
done
