//! The user's named choices (gating rule, activation, gap measure, single-expert weight):
//! one enum each, with one spelling table each, so that the command line, the browser page
//! and the JSON configs accept and write the same names.
//!
//! A table is declared with [`choice!`](crate::choice::choice) next to its enum; it gives the
//! enum `NAMES`, `name()`, [`FromStr`](std::str::FromStr) (error: [`Error::Choice`]),
//! [`Display`](std::fmt::Display) and serde. The command line (native only) builds its clap
//! value parsers from [`Choice`], so `--help` lists the same names.

use crate::error::Error;

/// A closed set of named values a user picks from.
pub trait Choice:
    Copy + std::str::FromStr<Err = Error> + std::fmt::Display + Send + Sync + 'static
{
    /// What the choice is called in messages ("gating", "activation").
    const OPTION: &'static str;
    /// Every accepted name, in the order they are listed.
    const NAMES: &'static [&'static str];
    /// One line of help per name ("" = none), for `--help`.
    const HELP: &'static [&'static str];
    /// This value's name.
    fn name(self) -> &'static str;
}

/// Declares the spelling table of a fieldless enum:
///
/// ```ignore
/// choice! { Gap, "gap",
///     Softmax = "softmax": "p1 - p2 on the full softmax",
///     Top2 = "top2" (serde "renormalized"),
/// }
/// ```
///
/// Each variant gets its name, optionally a different name in JSON (`(serde "...")`, for
/// file formats that predate the command-line name) and optionally a line of help. The
/// enum must not derive `Serialize`/`Deserialize` itself: the table provides them.
macro_rules! choice {
    (@serde $name:literal) => { $name };
    (@serde $name:literal $serde:literal) => { $serde };
    (@help) => { "" };
    (@help $help:literal) => { $help };
    (
        $ty:ident, $option:literal,
        $( $var:ident = $name:literal $( (serde $serde:literal) )? $( : $help:literal )? ),+ $(,)?
    ) => {
        impl $ty {
            /// Every accepted name, in the order they are listed.
            pub const NAMES: &'static [&'static str] = &[$($name),+];
            /// The names in JSON files.
            const SERDE_NAMES: &'static [&'static str] =
                &[$($crate::choice::choice!(@serde $name $($serde)?)),+];

            /// This value's name (as the command line and the page spell it).
            pub const fn name(self) -> &'static str {
                match self {
                    $($ty::$var => $name),+
                }
            }
        }

        impl $crate::choice::Choice for $ty {
            const OPTION: &'static str = $option;
            const NAMES: &'static [&'static str] = $ty::NAMES;
            const HELP: &'static [&'static str] = &[$($crate::choice::choice!(@help $($help)?)),+];
            fn name(self) -> &'static str {
                $ty::name(self)
            }
        }

        impl ::std::str::FromStr for $ty {
            type Err = $crate::error::Error;
            fn from_str(s: &str) -> ::std::result::Result<Self, Self::Err> {
                match s {
                    $($name => Ok($ty::$var),)+
                    _ => Err($crate::error::Error::Choice {
                        option: $option,
                        value: s.to_string(),
                        expected: $ty::NAMES,
                    }),
                }
            }
        }

        impl ::std::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.pad(self.name())
            }
        }

        impl ::serde::Serialize for $ty {
            fn serialize<S: ::serde::Serializer>(
                &self,
                s: S,
            ) -> ::std::result::Result<S::Ok, S::Error> {
                let i = *self as usize;
                s.serialize_unit_variant(stringify!($ty), i as u32, Self::SERDE_NAMES[i])
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $ty {
            fn deserialize<D: ::serde::Deserializer<'de>>(
                d: D,
            ) -> ::std::result::Result<Self, D::Error> {
                let s = <::std::string::String as ::serde::Deserialize>::deserialize(d)?;
                $(
                    if s == $crate::choice::choice!(@serde $name $($serde)?) {
                        return Ok($ty::$var);
                    }
                )+
                Err(<D::Error as ::serde::de::Error>::unknown_variant(&s, Self::SERDE_NAMES))
            }
        }
    };
}
pub(crate) use choice;

#[cfg(test)]
mod tests {
    use super::Choice;
    use crate::kernels::{Activation, GapMode, Gating, SingleWeight};
    use crate::train::TrainGating;
    use crate::Error;

    /// Every name parses to the value that prints it, and serde round-trips it.
    fn round_trip<T>()
    where
        T: Choice + PartialEq + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
    {
        assert_eq!(T::NAMES.len(), T::HELP.len());
        for &name in T::NAMES {
            let v: T = name.parse().unwrap();
            assert_eq!(v.to_string(), name);
            assert_eq!(v.name(), name);
            let json = serde_json::to_string(&v).unwrap();
            assert_eq!(serde_json::from_str::<T>(&json).unwrap(), v);
        }
        let err = "nonsense".parse::<T>().unwrap_err();
        match &err {
            Error::Choice {
                option,
                value,
                expected,
            } => {
                assert_eq!(*option, T::OPTION);
                assert_eq!(value, "nonsense");
                assert_eq!(*expected, T::NAMES);
            }
            e => panic!("not a choice error: {e}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("nonsense") && msg.contains(T::NAMES[0]),
            "{msg}"
        );
        assert!(serde_json::from_str::<T>("\"nonsense\"").is_err());
    }

    #[test]
    fn every_choice_round_trips() {
        round_trip::<Gating>();
        round_trip::<TrainGating>();
        round_trip::<Activation>();
        round_trip::<GapMode>();
        round_trip::<SingleWeight>();
    }

    /// The JSON names are those of the config.json files on disk.
    #[test]
    fn json_names_are_unchanged() {
        fn s(v: &impl serde::Serialize) -> String {
            serde_json::to_string(v).unwrap()
        }
        assert_eq!(s(&Gating::Top1), "\"top1\"");
        assert_eq!(s(&Gating::Top2), "\"top2\"");
        assert_eq!(s(&Gating::Adaptive), "\"adaptive\"");
        assert_eq!(s(&GapMode::Softmax), "\"softmax\"");
        assert_eq!(s(&GapMode::Top2), "\"top2\"");
        assert_eq!(s(&SingleWeight::RawP1), "\"raw_p1\"");
        assert_eq!(s(&SingleWeight::One), "\"one\"");
        assert_eq!(s(&Activation::Gelu), "\"gelu\"");
        assert_eq!(s(&Activation::SwiGlu), "\"swiglu\"");
        let e = serde_json::from_str::<Gating>("\"dense\"").unwrap_err();
        assert!(
            e.to_string()
                .contains("unknown variant `dense`, expected one of `top1`, `top2`, `adaptive`"),
            "{e}"
        );
        // The command line's names of the single-expert weight are not the file's.
        assert!(serde_json::from_str::<SingleWeight>("\"raw\"").is_err());
        assert!("raw_p1".parse::<SingleWeight>().is_err());
    }

    #[test]
    fn train_gating_splits_into_dense_and_rule() {
        use TrainGating::*;
        assert_eq!(Dense.split(), (true, Gating::Top1));
        assert_eq!(Top1.split(), (false, Gating::Top1));
        assert_eq!(Top2.split(), (false, Gating::Top2));
        assert_eq!(Adaptive.split(), (false, Gating::Adaptive));
        assert_eq!(TopK.split(), (false, Gating::TopK));
        for g in [Dense, Top1, Top2, Adaptive, TopK] {
            let (dense, gating) = g.split();
            assert_eq!(TrainGating::of(dense, gating), g);
        }
    }
}
