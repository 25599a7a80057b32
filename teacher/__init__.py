"""Inference around a GLIP checkpoint: prompts from caption phrases, batching, AMP, phrase-level boxes."""

from teacher.teacher import PhraseBox, Teacher, TeacherConfig, file_digest, teacher_id_of

__all__ = ["PhraseBox", "Teacher", "TeacherConfig", "file_digest", "teacher_id_of"]
