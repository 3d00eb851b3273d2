//! Meterline's query API: usage, margins, top spenders and alerts over the
//! store. Built under the query issue.
