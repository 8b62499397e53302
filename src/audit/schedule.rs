//! Whether a roster's audit schedule is one the Kubernetes API server accepts for a CronJob: the five-field
//! cron expression as its parser reads it (robfig/cron's standard parser) and an IANA time zone it can load.
//! Checked before the controller writes a CronJob, so a typo in one roster is a clear error on that roster
//! (its `AuditScheduled` condition, `meshline validate`) instead of a refused write that would fail every
//! reconcile of every flow it owns. Pure.

use crate::api::AuditSchedule;

/// One field of a cron expression: its name and the values it admits.
struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    /// Three-letter names, case-insensitive, for `min..` onwards.
    names: &'static [&'static str],
}

const FIELDS: [Field; 5] = [
    Field {
        name: "minute",
        min: 0,
        max: 59,
        names: &[],
    },
    Field {
        name: "hour",
        min: 0,
        max: 23,
        names: &[],
    },
    Field {
        name: "day of month",
        min: 1,
        max: 31,
        names: &[],
    },
    Field {
        name: "month",
        min: 1,
        max: 12,
        names: &[
            "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
        ],
    },
    Field {
        name: "day of week",
        min: 0,
        max: 6,
        names: &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
    },
];

/// What is wrong with `schedule`, each as (field path, reason); empty when the API server would take it.
pub fn problems(schedule: &AuditSchedule) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(expr) = &schedule.schedule
        && let Err(why) = cron(expr)
    {
        out.push(("spec.audit.schedule".to_string(), why));
    }
    if let Some(zone) = &schedule.time_zone
        && let Err(why) = time_zone(zone)
    {
        out.push(("spec.audit.timeZone".to_string(), why));
    }
    out
}

/// A five-field cron expression (minute, hour, day of month, month, day of week).
pub fn cron(expr: &str) -> Result<(), String> {
    if expr.contains("TZ=") {
        return Err(
            "a time zone in the schedule (TZ= or CRON_TZ=) is refused by Kubernetes; use spec.audit.timeZone"
                .into(),
        );
    }
    let parts: Vec<&str> = expr.split_whitespace().collect();
    if parts.len() != FIELDS.len() {
        return Err(format!(
            "{expr:?} has {} fields; a schedule has 5: minute hour day-of-month month day-of-week (e.g. \"0 2 * * *\")",
            parts.len()
        ));
    }
    for (part, field) in parts.iter().zip(&FIELDS) {
        for range in part.split(',') {
            cron_range(range, field).map_err(|why| format!("{expr:?}: {}: {why}", field.name))?;
        }
    }
    Ok(())
}

/// One comma-separated piece: `*` or `?`, `N`, `N-M`, each optionally `/STEP`.
fn cron_range(range: &str, field: &Field) -> Result<(), String> {
    let (span, step) = match range.split_once('/') {
        Some((span, step)) => (span, Some(step)),
        None => (range, None),
    };
    let (start, end) = if span == "*" || span == "?" {
        (field.min, field.max)
    } else {
        match span.split_once('-') {
            Some((a, b)) => (value(a, field)?, value(b, field)?),
            // `N/STEP` runs from N to the field's end.
            None if step.is_some() => (value(span, field)?, field.max),
            None => {
                let v = value(span, field)?;
                (v, v)
            }
        }
    };
    if start < field.min {
        return Err(format!(
            "beginning of range ({start}) below minimum ({})",
            field.min
        ));
    }
    if end > field.max {
        return Err(format!(
            "end of range ({end}) above maximum ({})",
            field.max
        ));
    }
    if start > end {
        return Err(format!(
            "beginning of range ({start}) beyond end of range ({end})"
        ));
    }
    if let Some(step) = step {
        match step.parse::<u32>() {
            Ok(n) if n > 0 => {}
            _ => return Err(format!("step {step:?} is not a positive number")),
        }
    }
    Ok(())
}

fn value(text: &str, field: &Field) -> Result<u32, String> {
    if let Some(i) = field
        .names
        .iter()
        .position(|n| n.eq_ignore_ascii_case(text))
    {
        return Ok(field.min + i as u32);
    }
    text.parse::<u32>().map_err(|_| {
        if field.names.is_empty() {
            format!("{text:?} is not a number")
        } else {
            format!(
                "{text:?} is not a number or one of {}",
                field.names.join(", ")
            )
        }
    })
}

/// An IANA time zone name, spelt exactly as the database does (the API server loads it by that name).
pub fn time_zone(zone: &str) -> Result<(), String> {
    if zone.eq_ignore_ascii_case("local") {
        return Err(
            "\"Local\" is refused by Kubernetes: name an IANA time zone, e.g. Europe/Berlin or UTC"
                .into(),
        );
    }
    match jiff::tz::db().get(zone) {
        Ok(tz) if tz.iana_name() == Some(zone) => Ok(()),
        Ok(tz) => Err(format!(
            "unknown time zone {zone:?}; did you mean {:?}? (names are case-sensitive)",
            tz.iana_name().unwrap_or_default()
        )),
        Err(_) => Err(format!(
            "unknown time zone {zone:?}: not in the IANA time zone database (e.g. Europe/Berlin, America/New_York, UTC)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_the_api_server_takes_pass() {
        for ok in [
            "0 2 * * *",
            "30 5 * * 1-5",
            "*/15 * * * *",
            "0 0 1,15 * *",
            "0 3 * JAN-MAR mon",
            "5/10 0-23/2 ? * SUN",
            "59 23 31 12 6",
        ] {
            assert_eq!(cron(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn schedules_the_api_server_refuses_are_named() {
        for (bad, why) in [
            ("0 2 * *", "has 4 fields"),
            ("60 2 * * *", "minute: end of range (60) above maximum (59)"),
            ("0 24 * * *", "hour: end of range (24)"),
            (
                "0 2 0 * *",
                "day of month: beginning of range (0) below minimum (1)",
            ),
            ("0 2 * 13 *", "month: end of range (13)"),
            (
                "0 2 * * 7",
                "day of week: end of range (7) above maximum (6)",
            ),
            (
                "0 2 * * FRI-MON",
                "beginning of range (5) beyond end of range (1)",
            ),
            ("*/0 * * * *", "step \"0\" is not a positive number"),
            ("0 2 * * funday", "\"funday\" is not a number or one of SUN"),
            ("CRON_TZ=UTC 0 2 * * *", "use spec.audit.timeZone"),
        ] {
            let e = cron(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn time_zones_are_iana_names_spelt_exactly() {
        for ok in ["Europe/Berlin", "America/New_York", "UTC", "Asia/Kolkata"] {
            assert_eq!(time_zone(ok), Ok(()), "{ok}");
        }
        assert!(
            time_zone("Mars/Olympus_Mons")
                .unwrap_err()
                .contains("unknown time zone")
        );
        assert!(
            time_zone("europe/berlin")
                .unwrap_err()
                .contains("\"Europe/Berlin\"")
        );
        assert!(
            time_zone("Local")
                .unwrap_err()
                .contains("refused by Kubernetes")
        );
    }

    #[test]
    fn problems_carry_their_field_paths() {
        let schedule = AuditSchedule {
            schedule: Some("0 25 * * *".into()),
            time_zone: Some("Nowhere/Land".into()),
            window: None,
            suspend: false,
        };
        let p = problems(&schedule);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].0, "spec.audit.schedule");
        assert_eq!(p[1].0, "spec.audit.timeZone");
        assert!(problems(&AuditSchedule::default()).is_empty());
    }
}
