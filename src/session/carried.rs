//! What a client's session carries from one server connection to the next: the
//! settings it wants and its prepared statements.

use super::prepared::ClientStatements;
use crate::upstream::SessionParams;

#[derive(Debug, Default)]
pub(crate) struct Carried {
    /// Settings the client wants on whatever server it uses.
    pub wanted: SessionParams,
    /// The settings of its startup packet: what RESET ALL and DISCARD ALL return to.
    pub startup: SessionParams,
    /// Its protocol-level prepared statements (transaction and statement mode).
    pub statements: ClientStatements,
}
